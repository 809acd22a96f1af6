//! The virtio-rng and virtio-net (tx) rate limiters measured from inside a guest that
//! saturates the device: the Rust test guest's `rng-saturate` and `net-tx-saturate`
//! scenarios move `ember.bytes` bytes as fast as the device allows, and print a line
//! before and after, which the host timestamps (the guest has no clock).
//!
//! Each limited transfer must take at least `(total - size - one_time_burst) / rate`
//! (times 0.95 for clock and line-delivery slack): a lower bound, which slowness cannot
//! break, and which fails if the limiter is removed. The same transfer without a limit
//! must beat the configured rate by far, so the bound means something. Run with
//! `--nocapture` to see the measured rates against the configured ones:
//!
//! `cargo test -p ember-vmm --test rate_limit -- --nocapture --test-threads 1`
//!
//! The net test needs root, `/dev/net/tun` and `ip` (iproute2), and says so loudly and
//! passes without them, unless `EMBER_REQUIRE_TAP=1`; its tap lives in a private network
//! namespace, deleted afterwards.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ember_guests::rust_guest::build_guest;
use ember_guests::testing::kvm_available;

/// Slack on the lower bound: the guest's lines reach us through the serial port and a
/// pipe, a little after the transfer starts and ends.
const SLACK: f64 = 0.95;

/// One run of `ember`, its stdout lines stamped with their arrival time.
struct Run {
    status: Option<ExitStatus>,
    lines: Vec<(Instant, String)>,
    stderr: String,
}

impl Run {
    fn context(&self) -> String {
        let stdout: String = self.lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        format!(
            "status: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            self.status, self.stderr
        )
    }

    fn assert_success(&self) {
        assert_eq!(
            self.status.and_then(|s| s.code()),
            Some(0),
            "{}",
            self.context()
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.context());
    }

    /// The arrival time of the first line starting with `prefix`.
    fn line(&self, prefix: &str) -> Instant {
        self.lines
            .iter()
            .find(|(_, l)| l.starts_with(prefix))
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("no line starts with {prefix:?}\n{}", self.context()))
    }

    /// The time between the guest's `saturate start` and `saturate done` lines.
    fn transfer_time(&self) -> Duration {
        self.line("virtio-guest: saturate done")
            .duration_since(self.line("virtio-guest: saturate start"))
    }
}

/// Runs `command`, killing it after `timeout`.
fn run(mut command: Command, timeout: Duration) -> Run {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines.push((Instant::now(), line));
        }
        lines
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("waiting for ember") {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Run {
        status,
        lines: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

fn guest() -> PathBuf {
    build_guest("virtio-guest").unwrap_or_else(|e| panic!("{e}"))
}

/// `[prefix...] ember --kernel <virtio-guest> <args> --cmdline "console=ttyS0 <cmdline>"`.
fn ember(prefix: &[&str], guest: &Path, args: &[&str], cmdline: &str) -> Command {
    let ember = env!("CARGO_BIN_EXE_ember");
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(ember);
            c
        }
        None => Command::new(ember),
    };
    command
        .arg("--kernel")
        .arg(guest)
        .args(args)
        .args(["--cmdline", &format!("console=ttyS0 {cmdline}")]);
    command
}

/// One token bucket as the command line gives it.
#[derive(Clone, Copy)]
struct Bucket {
    size: u64,
    burst: u64,
    refill_ms: u64,
}

impl Bucket {
    fn rate(&self) -> f64 {
        self.size as f64 * 1000.0 / self.refill_ms as f64
    }

    /// The command-line keys, e.g. `bw_size=..,bw_one_time_burst=..,bw_refill_time=..`
    /// for `prefix` `bw_`.
    fn keys(&self, prefix: &str) -> String {
        format!(
            "{prefix}size={},{prefix}one_time_burst={},{prefix}refill_time={}",
            self.size, self.burst, self.refill_ms
        )
    }

    /// The least time `total` tokens can take: all but the bucket and the burst at the
    /// refill rate.
    fn min_time(&self, total: u64) -> Duration {
        Duration::from_secs_f64(total.saturating_sub(self.size + self.burst) as f64 / self.rate())
    }
}

/// A limited and an unlimited run of the same saturating transfer.
struct Measure<'a> {
    what: &'a str,
    unit: &'a str,
    /// Tokens the transfer takes from the bucket (bytes, or requests).
    total: u64,
    bucket: Bucket,
    limited: &'a Run,
    unlimited: &'a Run,
}

impl Measure<'_> {
    /// Checks the lower bound and that the unlimited transfer is much faster, and prints
    /// the measured rates against the configured one.
    fn check(&self) {
        self.limited.assert_success();
        self.unlimited.assert_success();
        let limited = self.limited.transfer_time();
        let unlimited = self.unlimited.transfer_time();
        let min = self.bucket.min_time(self.total).mul_f64(SLACK);
        let rate = self.bucket.rate();
        // The steady part of the transfer: what the bucket and burst did not cover.
        let steady = self
            .total
            .saturating_sub(self.bucket.size + self.bucket.burst) as f64;
        let measured = steady / limited.as_secs_f64();
        let free = self.total as f64 / unlimited.as_secs_f64();
        eprintln!(
            "{}: configured {rate:.0} {unit}/s (size {}, one_time_burst {}, refill_time {} ms); \
             {} {unit} limited in {limited:.3?} (at least {min:.3?}): steady rate {measured:.0} {unit}/s, \
             accuracy {:.3}; unlimited in {unlimited:.3?}: {free:.0} {unit}/s ({:.1}x the limit)",
            self.what,
            self.bucket.size,
            self.bucket.burst,
            self.bucket.refill_ms,
            self.total,
            measured / rate,
            free / rate,
            unit = self.unit,
        );
        assert!(
            limited >= min,
            "{}: the guest moved {} {} in {limited:?}, faster than the limit allows \
             (at least {min:?})\n{}",
            self.what,
            self.total,
            self.unit,
            self.limited.context()
        );
        // Without the limiter the same transfer beats the limit by far, so the bound
        // above is the limiter's doing.
        assert!(
            free > 3.0 * rate,
            "{}: unlimited, the guest managed only {free:.0} {}/s, too close to the \
             configured {rate:.0} for this test to show anything\n{}",
            self.what,
            self.unit,
            self.unlimited.context()
        );
    }
}

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn rng_bandwidth_limit_holds_a_saturating_guest() {
    if !kvm_available("rng_bandwidth_limit_holds_a_saturating_guest") {
        return;
    }
    let guest = guest();
    // 1 MiB/s, 256 KiB bucket, 512 KiB once; the guest takes 4 MiB in 4 KiB requests.
    let bucket = Bucket {
        size: 256 << 10,
        burst: 512 << 10,
        refill_ms: 250,
    };
    let total = 4 << 20;
    let cmdline = format!("ember.test=rng-saturate ember.bytes={total} ember.req=4096");
    let limited = run(
        ember(&[], &guest, &["--rng", &bucket.keys("bw_")], &cmdline),
        TIMEOUT,
    );
    let unlimited = run(ember(&[], &guest, &["--rng"], &cmdline), TIMEOUT);
    Measure {
        what: "virtio-rng bandwidth",
        unit: "bytes",
        total,
        bucket,
        limited: &limited,
        unlimited: &unlimited,
    }
    .check();
}

#[test]
fn rng_ops_limit_holds_a_saturating_guest() {
    if !kvm_available("rng_ops_limit_holds_a_saturating_guest") {
        return;
    }
    let guest = guest();
    // 1000 requests/s, 100 at once; the guest makes 2000 requests of 64 bytes.
    let bucket = Bucket {
        size: 100,
        burst: 0,
        refill_ms: 100,
    };
    let requests = 2000;
    let cmdline = format!(
        "ember.test=rng-saturate ember.bytes={} ember.req=64",
        requests * 64
    );
    let limited = run(
        ember(&[], &guest, &["--rng", &bucket.keys("ops_")], &cmdline),
        TIMEOUT,
    );
    let unlimited = run(ember(&[], &guest, &["--rng"], &cmdline), TIMEOUT);
    Measure {
        what: "virtio-rng ops",
        unit: "requests",
        total: requests,
        bucket,
        limited: &limited,
        unlimited: &unlimited,
    }
    .check();
}

/// Reports that a test needing a tap did not run; fatal with `EMBER_REQUIRE_TAP=1`.
fn tap_unavailable(test: &str, why: &str) {
    let required = std::env::var("EMBER_REQUIRE_TAP").is_ok_and(|v| v == "1");
    eprintln!(
        "!!! TAP UNAVAILABLE: test `{test}` did NOT run: {why}{}",
        if required {
            ""
        } else {
            " (set EMBER_REQUIRE_TAP=1 to make this fatal)"
        }
    );
    assert!(
        !required,
        "{test}: a tap is required (EMBER_REQUIRE_TAP=1) but: {why}"
    );
}

/// Runs `ip <args>`; the error says what failed.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A private network namespace with an up tap `rltap0` in it, deleted on drop.
struct Netns(String);

impl Netns {
    fn with_tap() -> Result<Netns, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ember-rl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        for args in [
            &["tuntap", "add", "dev", "rltap0", "mode", "tap", "vnet_hdr"][..],
            &["link", "set", "rltap0", "up"],
        ] {
            let mut all = vec!["-n", ns.0.as_str()];
            all.extend_from_slice(args);
            ip(&all)?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.0]) {
            eprintln!("cannot delete network namespace {}: {e}", self.0);
        }
    }
}

/// A namespace with a tap, or why there is none.
fn tap_namespace() -> Result<Netns, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    ip(&["-V"]).map_err(|e| format!("no iproute2: {e}"))?;
    Netns::with_tap().map_err(|e| format!("cannot set up a namespace with a tap: {e}"))
}

#[test]
fn net_tx_limits_hold_a_saturating_guest() {
    const TEST: &str = "net_tx_limits_hold_a_saturating_guest";
    if !kvm_available(TEST) {
        return;
    }
    let ns = match tap_namespace() {
        Ok(ns) => ns,
        Err(why) => return tap_unavailable(TEST, &why),
    };
    let guest = guest();
    let netns = ["ip", "netns", "exec", ns.0.as_str()];
    let net = |limits: &str| {
        if limits.is_empty() {
            "tap=rltap0".to_string()
        } else {
            format!("tap=rltap0,{limits}")
        }
    };

    // Bandwidth: 1 MiB/s, 128 KiB bucket, 256 KiB once; 4 MiB of 1526-byte frames
    // (1514-byte Ethernet frames and the 12-byte header, all charged).
    let bucket = Bucket {
        size: 128 << 10,
        burst: 256 << 10,
        refill_ms: 125,
    };
    let frame = 1526;
    let frames = (4 << 20) / frame;
    let total = frames * frame;
    let cmdline = format!("ember.test=net-tx-saturate ember.bytes={total} ember.req={frame}");
    let limited = run(
        ember(
            &netns,
            &guest,
            &["--net", &net(&bucket.keys("tx_bw_"))],
            &cmdline,
        ),
        TIMEOUT,
    );
    let unlimited = run(
        ember(&netns, &guest, &["--net", &net("")], &cmdline),
        TIMEOUT,
    );
    Measure {
        what: "virtio-net tx bandwidth",
        unit: "bytes",
        total,
        bucket,
        limited: &limited,
        unlimited: &unlimited,
    }
    .check();

    // Operations: 1000 frames/s, 100 at once; 2000 frames of 64 bytes.
    let bucket = Bucket {
        size: 100,
        burst: 0,
        refill_ms: 100,
    };
    let frames = 2000;
    let cmdline = format!(
        "ember.test=net-tx-saturate ember.bytes={} ember.req=64",
        frames * 64
    );
    let limited = run(
        ember(
            &netns,
            &guest,
            &["--net", &net(&bucket.keys("tx_ops_"))],
            &cmdline,
        ),
        TIMEOUT,
    );
    let unlimited = run(
        ember(&netns, &guest, &["--net", &net("")], &cmdline),
        TIMEOUT,
    );
    Measure {
        what: "virtio-net tx ops",
        unit: "frames",
        total: frames,
        bucket,
        limited: &limited,
        unlimited: &unlimited,
    }
    .check();
}
