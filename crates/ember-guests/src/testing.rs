//! Helpers for tests: the `/dev/kvm` guard, the process's resident set, a small
//! deterministic random generator, a network namespace holding a tap
//! ([`TapNamespace`], with the loud [`tap_unavailable`] skip), and running a command
//! with its output captured and a timeout ([`run_with_timeout`]).

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Environment variable that turns a missing or unusable `/dev/kvm` into a test failure.
/// `.ci/run` sets it on machines where KVM is expected.
pub const REQUIRE_KVM_ENV: &str = "EMBER_REQUIRE_KVM";

/// Checks that `/dev/kvm` can be opened for reading and writing.
///
/// Returns `true` when the calling test can go on. When KVM is not usable it prints a
/// loud line naming the test, and then panics if [`REQUIRE_KVM_ENV`] is set to `1`, so
/// that a test never passes silently without running. Call it first in every KVM test:
///
/// ```
/// if !ember_guests::testing::kvm_available("doc_example") {
///     return;
/// }
/// // ... create a VM ...
/// ```
pub fn kvm_available(test: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(err) => {
            let required = std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1");
            eprintln!(
                "!!! KVM UNAVAILABLE: test `{test}` did NOT run: cannot open /dev/kvm: {err}{}",
                if required {
                    ""
                } else {
                    " (set EMBER_REQUIRE_KVM=1 to make this fatal)"
                }
            );
            assert!(
                !required,
                "{test}: KVM is required ({REQUIRE_KVM_ENV}=1) but /dev/kvm is unusable: {err}"
            );
            false
        }
    }
}

/// Resident set size of this process in bytes (`/proc/self/statm`, second field), for
/// tests that check memory is given back.
///
/// ```
/// assert!(ember_guests::testing::rss_bytes() > 0);
/// ```
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm")
        .unwrap_or_else(|e| panic!("cannot read /proc/self/statm: {e}"));
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("unexpected /proc/self/statm: {statm:?}"));
    // SAFETY: sysconf only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_size).unwrap_or(4096)
}

/// A tiny xorshift64 generator for tests that want deterministic pseudo-random input
/// without a dependency.
///
/// ```
/// let mut rng = ember_guests::testing::XorShift::new(7);
/// assert_ne!(rng.next(), rng.next());
/// ```
pub struct XorShift(u64);

impl XorShift {
    /// A generator seeded with `seed` (0 is replaced by 1: xorshift needs a non-zero
    /// state).
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Environment variable that turns a missing tap (see [`TapNamespace`]) into a test
/// failure. `.ci/run` sets it on machines where root and `/dev/net/tun` are expected.
pub const REQUIRE_TAP_ENV: &str = "EMBER_REQUIRE_TAP";

/// Reports loudly that test `test` did NOT run because it has no tap (`why`, usually a
/// [`TapError`]), and panics if [`REQUIRE_TAP_ENV`] is `1`, so that a test never passes
/// silently without running:
///
/// ```no_run
/// use ember_guests::testing::{tap_unavailable, TapNamespace};
///
/// let ns = match TapNamespace::create("doc", "doctap0") {
///     Ok(ns) => ns,
///     Err(why) => return tap_unavailable("doc_example", why),
/// };
/// ```
pub fn tap_unavailable(test: &str, why: impl std::fmt::Display) {
    report_tap_unavailable(&format!("test `{test}`"), test, &why);
}

/// Like [`tap_unavailable`], for a test that goes on without the part that needs the tap:
/// ``!!! TAP UNAVAILABLE: <part> of test `<test>` did NOT run: <why>``.
pub fn tap_part_unavailable(test: &str, part: &str, why: impl std::fmt::Display) {
    report_tap_unavailable(&format!("{part} of test `{test}`"), test, &why);
}

fn report_tap_unavailable(what: &str, test: &str, why: &dyn std::fmt::Display) {
    let required = std::env::var(REQUIRE_TAP_ENV).is_ok_and(|v| v == "1");
    eprintln!(
        "!!! TAP UNAVAILABLE: {what} did NOT run: {why}{}",
        if required {
            ""
        } else {
            " (set EMBER_REQUIRE_TAP=1 to make this fatal)"
        }
    );
    assert!(
        !required,
        "{test}: a tap is required ({REQUIRE_TAP_ENV}=1) but: {why}"
    );
}

/// Why an `ip` (iproute2) command failed.
#[derive(Debug, thiserror::Error)]
pub enum IpError {
    /// `ip` could not be started (not installed?).
    #[error("cannot run `ip {args}`: {source}")]
    Spawn {
        /// The arguments, joined by spaces.
        args: String,
        /// What starting it returned.
        source: std::io::Error,
    },
    /// `ip` ran and failed.
    #[error("`ip {args}` failed ({status}): {stderr}")]
    Failed {
        /// The arguments, joined by spaces.
        args: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// `ip` printed something other than what was expected.
    #[error("no {what} in the output of `ip {args}`: {output}")]
    Output {
        /// What was looked for.
        what: &'static str,
        /// The arguments, joined by spaces.
        args: String,
        /// What it printed.
        output: String,
    },
}

/// Runs `ip <args>` and returns its stdout.
pub fn ip(args: &[&str]) -> Result<String, IpError> {
    let joined = || args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| IpError::Spawn {
            args: joined(),
            source,
        })?;
    if !out.status.success() {
        return Err(IpError::Failed {
            args: joined(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why a [`TapNamespace`] cannot be made. Its text is what
/// [`tap_unavailable`] prints.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Only root can create network namespaces and taps.
    #[error("not root")]
    NotRoot,
    /// The kernel offers no tun/tap device.
    #[error("no /dev/net/tun")]
    NoTun,
    /// iproute2's `ip` is missing or broken.
    #[error("no iproute2: {0}")]
    NoIproute2(IpError),
    /// `ip netns add` failed.
    #[error("cannot create network namespace {namespace}: {source}")]
    Namespace {
        /// The namespace's name.
        namespace: String,
        /// The failed command.
        source: IpError,
    },
    /// Creating, addressing or raising the tap failed.
    #[error("cannot set up tap {tap} in network namespace {namespace}: {source}")]
    Tap {
        /// The tap's name.
        tap: String,
        /// The namespace's name.
        namespace: String,
        /// The failed command.
        source: IpError,
    },
}

/// A private network namespace holding one tap (`ip tuntap add ... mode tap vnet_hdr`,
/// up), for tests of `ember --net tap=<tap>`; deleted on drop (also when the test
/// fails), tap and all, so no traffic leaves it.
///
/// `ember` must run inside the namespace to see the tap: start it with
/// [`TapNamespace::exec`]. Needs root, `/dev/net/tun` and iproute2; without them
/// [`TapNamespace::create`] says why, and the test reports it with [`tap_unavailable`].
///
/// ```no_run
/// use ember_guests::testing::{tap_unavailable, TapNamespace};
///
/// let ns = match TapNamespace::create("doc", "doctap0") {
///     Ok(ns) => ns,
///     Err(why) => return tap_unavailable("doc_example", why),
/// };
/// let mut ember = ns.exec("ember");
/// ember.args(["--net", &format!("tap={}", ns.tap())]);
/// let (rx, tx) = ns.packets().unwrap();
/// ```
#[derive(Debug)]
pub struct TapNamespace {
    name: String,
    tap: String,
}

impl TapNamespace {
    /// A namespace named `ember-<prefix>-<pid>-<n>` (unique within this process and
    /// among concurrent test processes) holding tap `tap`, up.
    pub fn create(prefix: &str, tap: &str) -> Result<TapNamespace, TapError> {
        Self::setup(prefix, tap, None)
    }

    /// Like [`TapNamespace::create`], with `address` (`ip addr add` syntax, e.g.
    /// `10.0.2.1/24`) given to the tap's host side before it goes up.
    pub fn with_address(prefix: &str, tap: &str, address: &str) -> Result<TapNamespace, TapError> {
        Self::setup(prefix, tap, Some(address))
    }

    fn setup(prefix: &str, tap: &str, address: Option<&str>) -> Result<TapNamespace, TapError> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(TapError::NotRoot);
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err(TapError::NoTun);
        }
        ip(&["-V"]).map_err(TapError::NoIproute2)?;
        let name = format!(
            "ember-{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]).map_err(|source| TapError::Namespace {
            namespace: name.clone(),
            source,
        })?;
        // From here on, dropping `ns` deletes the namespace.
        let ns = TapNamespace {
            name,
            tap: tap.to_string(),
        };
        let mut steps = vec![vec!["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]];
        if let Some(address) = address {
            steps.push(vec!["addr", "add", address, "dev", tap]);
        }
        steps.push(vec!["link", "set", tap, "up"]);
        for step in steps {
            ns.ip(&step).map_err(|source| TapError::Tap {
                tap: tap.to_string(),
                namespace: ns.name.clone(),
                source,
            })?;
        }
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec <name>` or `/run/netns/<name>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap's name.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// `ip netns exec <namespace> <program>`: a command that runs `program` inside the
    /// namespace (`ip` execs it in place, so the child's pid is `program`'s).
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// `ip -n <namespace> <args>`: its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, IpError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The tap's host-side (RX, TX) packet counters, from `ip -s link show`: RX counts
    /// the frames the guest sent, TX those the host sent it.
    pub fn packets(&self) -> Result<(u64, u64), IpError> {
        let args = ["-s", "link", "show", self.tap.as_str()];
        let out = self.ip(&args)?;
        // "    RX:  bytes packets errors ..." with the values on the next line; TX alike.
        let count = |which: &'static str| {
            let mut lines = out.lines();
            while let Some(line) = lines.next() {
                if line.trim_start().starts_with(which) {
                    return lines
                        .next()
                        .and_then(|v| v.split_whitespace().nth(1))
                        .and_then(|v| v.parse().ok());
                }
            }
            None
        };
        let missing = |what| IpError::Output {
            what,
            args: format!("-n {} {}", self.name, args.join(" ")),
            output: out.clone(),
        };
        let rx = count("RX:").ok_or_else(|| missing("RX packet count"))?;
        let tx = count("TX:").ok_or_else(|| missing("TX packet count"))?;
        Ok((rx, tx))
    }
}

impl Drop for TapNamespace {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cannot delete network namespace {}: {e}", self.name);
        }
    }
}

/// How a command run by [`run_with_timeout`] ended and what it printed.
#[derive(Debug)]
pub struct CapturedRun {
    /// Its exit status; `None` if it was still running at the timeout and was killed.
    pub status: Option<ExitStatus>,
    /// When it was started.
    pub started: Instant,
    /// Everything it wrote to stdout (invalid UTF-8 replaced).
    pub stdout: String,
    /// Its stdout lines (without `\n` or `\r\n`), each with the time it arrived: how
    /// tests time what a guest does (the guest has no clock of its own).
    pub lines: Vec<(Instant, String)>,
    /// Everything it wrote to stderr (invalid UTF-8 replaced).
    pub stderr: String,
}

impl CapturedRun {
    /// Its exit code; `None` if it timed out or was ended by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Status, stdout and stderr, for assertion messages.
    pub fn context(&self) -> String {
        format!(
            "status: {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Asserts that it ended by itself, with exit code 0, and that nothing panicked
    /// (no `panicked` on stdout or stderr).
    pub fn assert_success(&self) {
        assert!(self.status.is_some(), "timed out\n{}", self.context());
        assert_eq!(self.code(), Some(0), "{}", self.context());
        assert!(!self.stderr.contains("panicked"), "{}", self.context());
        assert!(!self.stdout.contains("panicked"), "{}", self.context());
    }

    /// The arrival time of the stdout line equal to `line`; panics if there is none.
    pub fn line(&self, line: &str) -> Instant {
        self.lines
            .iter()
            .find(|(_, l)| l == line)
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("missing line {line:?}\n{}", self.context()))
    }

    /// The arrival time of the first stdout line starting with `prefix`; panics if
    /// there is none.
    pub fn line_starting(&self, prefix: &str) -> Instant {
        self.lines
            .iter()
            .find(|(_, l)| l.starts_with(prefix))
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("no line starts with {prefix:?}\n{}", self.context()))
    }

    /// The rest of the first stdout line starting with `prefix`; panics if there is
    /// none.
    pub fn after(&self, prefix: &str) -> String {
        self.lines
            .iter()
            .find_map(|(_, l)| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starts with {prefix:?}\n{}", self.context()))
            .to_string()
    }
}

/// Runs `command` with stdin empty and stdout and stderr captured (read as they come,
/// so a chatty child never blocks on a full pipe), killing it with SIGKILL if it has not
/// exited after `timeout`; panics only if it cannot be started or waited for.
///
/// ```
/// use std::process::Command;
/// use std::time::Duration;
///
/// let mut echo = Command::new("echo");
/// echo.arg("hello");
/// let run = ember_guests::testing::run_with_timeout(&mut echo, Duration::from_secs(60));
/// run.assert_success();
/// assert_eq!(run.lines[0].1, "hello");
///
/// let mut sleep = Command::new("sleep");
/// sleep.arg("60");
/// let run = ember_guests::testing::run_with_timeout(&mut sleep, Duration::from_millis(10));
/// assert!(run.status.is_none(), "killed at the timeout");
/// ```
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> CapturedRun {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut lines = Vec::new();
        let Some(stdout) = stdout else {
            return (all, lines);
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match stdout.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    all.extend_from_slice(&line);
                    let text = line.strip_suffix(b"\n").unwrap_or(&line);
                    let text = text.strip_suffix(b"\r").unwrap_or(text);
                    lines.push((at, String::from_utf8_lossy(text).into_owned()));
                }
            }
        }
        (all, lines)
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_end(&mut text);
        }
        text
    });
    let deadline = started + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot wait for {command:?}: {e}"),
        }
    };
    let (stdout, lines) = out_reader
        .join()
        .unwrap_or_else(|_| panic!("the stdout reader of {command:?} panicked"));
    let stderr = err_reader
        .join()
        .unwrap_or_else(|_| panic!("the stderr reader of {command:?} panicked"));
    CapturedRun {
        status,
        started,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        lines,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// One HTTP/1.1 request to an API server on the Unix socket `socket` (Firecracker's
/// API, as `ember --api-sock` serves it), with a JSON `body` if given; returns the
/// status code and the response body. Each call uses a connection of its own.
///
/// ```no_run
/// let (status, body) = ember_guests::testing::api_request(
///     std::path::Path::new("/tmp/ember.sock"), "PATCH", "/vm", Some(r#"{"state": "Paused"}"#),
/// ).unwrap();
/// assert_eq!(status, 204, "{body}");
/// ```
pub fn api_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body.unwrap_or("");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if !body.is_empty() || method != "GET" {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("Connection: close\r\n\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Waits (up to `timeout`) until something listens on the Unix socket `socket`.
pub fn wait_for_socket(socket: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A child process whose stdout lines a test watches while it runs (e.g. `ember`
/// serving an API socket), with stdin a pipe the test may write to. Dropping it kills
/// the child.
pub struct LiveChild {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::Arc<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl LiveChild {
    /// Starts `command` with stdin, stdout and stderr piped.
    pub fn spawn(command: &mut Command) -> LiveChild {
        use std::sync::{Arc, Condvar, Mutex};
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let lines = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    let (list, changed) = &*lines;
                    if let Ok(mut list) = list.lock() {
                        list.push(text);
                    }
                    changed.notify_all();
                }
            }));
        }
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut all) = stderr.lock() {
                        all.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            }));
        }
        let stdin = child.stdin.take();
        LiveChild {
            child,
            stdin,
            lines,
            stderr,
            readers,
        }
    }

    /// The child's process ID.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a stdout line starting with `prefix`, at or after line
    /// number `from`; returns its index and text.
    pub fn wait_for_line(
        &self,
        prefix: &str,
        from: usize,
        timeout: Duration,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let (list, changed) = &*self.lines;
        let mut list = list.lock().ok()?;
        loop {
            if let Some((i, line)) = list
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.starts_with(prefix))
            {
                return Some((i, line.clone()));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            list = changed.wait_timeout(list, left).ok()?.0;
        }
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Everything on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Writes `bytes` to the child's stdin.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(bytes).and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin is closed")),
        }
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the child to exit (killing it then) and for its
    /// output; returns its exit status (`None` if it had to be killed).
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    self.kill();
                    break None;
                }
            }
        };
        self.stdin = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// Stdout and stderr so far, for assertion messages.
    pub fn context(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.lines().join("\n"),
            self.stderr()
        )
    }
}

impl Drop for LiveChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `bash scripts/<script>` from the workspace root (e.g. `linux-guest.sh`,
/// `small-kernel.sh`, which build and cache the Linux guest) and returns the path it
/// prints for `key` (a `KEY=path` line).
pub fn guest_script_path(script: &str, key: &str) -> Result<std::path::PathBuf, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    let out = Command::new("bash")
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", path.display(), out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(std::path::PathBuf::from)
        .ok_or_else(|| format!("no {key}= line in the output of {script}: {text}"))
}

/// Says loudly that `test` did not run because the Linux guest (or a tool it needs) is
/// missing; panics instead with `EMBER_REQUIRE_LINUX=1` (set by `.ci/run`).
pub fn linux_unavailable(test: &str, why: &str) {
    let required = std::env::var("EMBER_REQUIRE_LINUX").is_ok_and(|v| v == "1");
    eprintln!(
        "!!! LINUX GUEST UNAVAILABLE: test `{test}` did NOT run: {why}{}",
        if required {
            ""
        } else {
            " (set EMBER_REQUIRE_LINUX=1 to make this fatal)"
        }
    );
    assert!(
        !required,
        "{test}: EMBER_REQUIRE_LINUX=1 but the Linux guest is unavailable: {why}"
    );
}
