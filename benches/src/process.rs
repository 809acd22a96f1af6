//! Whole VMM processes (`ember`, QEMU) run on a guest image and measured from outside:
//! wall time from spawn to reaping, the CPU time of every thread (`wait4`), and, in a
//! traced run, the memory at the moment the process exits.
//!
//! The memory is read with `ptrace`'s exit stop (`PTRACE_O_TRACEEXIT`): the VMM's main
//! thread stops just before it exits, with its address space intact, and its
//! `/proc/<pid>/status` (`VmHWM`, `VmRSS`) and `/proc/<pid>/smaps` (the resident size
//! of the guest RAM mapping) are read there. `getrusage`'s `ru_maxrss` is not used: it
//! also counts the address space the child had before `exec`, the spawning process's.

use std::ffi::c_void;
use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr;
use std::time::{Duration, Instant};

use crate::Error;

/// Guest RAM every VMM here is given, in MiB.
pub const GUEST_RAM_MIB: u64 = 64;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signalled(i32),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Exited(code) => write!(f, "exit status {code}"),
            Ended::Signalled(sig) => write!(f, "killed by signal {sig}"),
        }
    }
}

/// Memory of a process at its exit, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryAtExit {
    /// `VmHWM`: the peak resident set.
    pub hwm_kib: u64,
    /// `VmRSS`: the resident set at exit.
    pub rss_kib: u64,
    /// Resident pages of the guest RAM mapping (the guest pages that were touched, by
    /// the guest or by the VMM loading it), or `None` if the mapping was not found.
    pub guest_kib: Option<u64>,
}

impl MemoryAtExit {
    /// The VMM's own memory: the peak resident set less the guest RAM that is
    /// resident.
    pub fn vmm_kib(&self) -> Option<u64> {
        self.guest_kib.map(|g| self.hwm_kib.saturating_sub(g))
    }
}

/// One run of a VMM process.
#[derive(Debug, Clone)]
pub struct ProcessRun {
    /// From just before spawning to reaping.
    pub wall: Duration,
    /// User CPU time of all its threads.
    pub user: Duration,
    /// System CPU time of all its threads.
    pub system: Duration,
    /// How it ended.
    pub ended: Ended,
    /// What it wrote to stderr.
    pub stderr: String,
    /// Memory at exit, for a traced run.
    pub memory: Option<MemoryAtExit>,
}

fn timeval(tv: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(tv.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(tv.tv_usec).unwrap_or(0))
}

fn os_error(what: impl Into<String>) -> Error {
    Error::Process {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// `wait4(pid)`, retried on `EINTR`.
fn wait4(pid: libc::pid_t) -> Result<(i32, libc::rusage), Error> {
    loop {
        let mut status = 0;
        // SAFETY: zero is a valid `rusage`.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `usage` are valid for writes; `__WALL` waits for the
        // traced thread too.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::__WALL, &mut usage) };
        if rc == pid {
            return Ok((status, usage));
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(os_error(format!("wait4 for process {pid}")));
        }
    }
}

fn ptrace(request: libc::c_uint, pid: libc::pid_t, data: usize) -> Result<(), Error> {
    // SAFETY: the requests used here (SETOPTIONS, CONT) take an integer `data` and no
    // pointers into our memory.
    let rc = unsafe { libc::ptrace(request, pid, ptr::null_mut::<c_void>(), data) };
    if rc == -1 {
        return Err(os_error(format!("ptrace({request}) on process {pid}")));
    }
    Ok(())
}

/// Runs `command` to its end with stdin and stdout on `/dev/null` and stderr
/// captured. With `guest_ram` (which mappings of the VMM hold guest RAM), the process
/// is traced and its memory read at its exit stop.
pub fn run(command: &mut Command, guest_ram: Option<&GuestRam>) -> Result<ProcessRun, Error> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if guest_ram.is_some() {
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                let rc = libc::ptrace(
                    libc::PTRACE_TRACEME,
                    0,
                    ptr::null_mut::<c_void>(),
                    ptr::null_mut::<c_void>(),
                );
                if rc == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let name = command.get_program().to_string_lossy().into_owned();
    let start = Instant::now();
    let mut child = command.spawn().map_err(|source| Error::Process {
        what: format!("cannot start {name}"),
        source,
    })?;
    let pid = child.id() as libc::pid_t;
    // Drained on a thread of its own, so that a chatty process cannot block on a full
    // pipe while we wait for it (or while it sits in a ptrace stop).
    let mut pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = pipe.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });

    let mut memory = None;
    let (status, usage) = match guest_ram {
        None => wait4(pid)?,
        Some(guest_ram) => {
            let (status, _) = wait4(pid)?;
            if !(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGTRAP) {
                return Err(Error::Vmm(format!(
                    "{name}: expected a stop at exec under ptrace, got wait status {status:#x}"
                )));
            }
            ptrace(
                libc::PTRACE_SETOPTIONS,
                pid,
                (libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL) as usize,
            )?;
            ptrace(libc::PTRACE_CONT, pid, 0)?;
            loop {
                let (status, usage) = wait4(pid)?;
                if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                    break (status, usage);
                }
                if status >> 8 == (libc::SIGTRAP | (libc::PTRACE_EVENT_EXIT << 8)) {
                    memory = Some(read_memory(pid, guest_ram)?);
                    ptrace(libc::PTRACE_CONT, pid, 0)?;
                } else if libc::WIFSTOPPED(status) {
                    // A signal for the traced thread: deliver it.
                    ptrace(libc::PTRACE_CONT, pid, libc::WSTOPSIG(status) as usize)?;
                }
            }
        }
    };
    let wall = start.elapsed();
    let stderr = reader.join().unwrap_or_default();
    drop(child); // already reaped by wait4; dropping a Child does not wait.
    let ended = if libc::WIFEXITED(status) {
        Ended::Exited(libc::WEXITSTATUS(status))
    } else {
        Ended::Signalled(libc::WTERMSIG(status))
    };
    Ok(ProcessRun {
        wall,
        user: timeval(usage.ru_utime),
        system: timeval(usage.ru_stime),
        ended,
        stderr,
        memory,
    })
}

/// Which mappings of a VMM hold guest RAM, as `/proc/<pid>/smaps` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRam {
    /// Anonymous mappings of exactly this many KiB (`ember`'s guest RAM, and QEMU's
    /// default RAM backend, are one anonymous mapping of the RAM size). Exactly one
    /// must match, or the guest RAM counts as not found.
    AnonymousOfSize(u64),
}

impl GuestRam {
    fn matches(&self, path: &str, size_kib: u64) -> bool {
        match self {
            GuestRam::AnonymousOfSize(kib) => path.is_empty() && size_kib == *kib,
        }
    }
}

/// Reads `VmHWM` and `VmRSS` of `pid` and the resident size of its guest RAM.
fn read_memory(pid: libc::pid_t, guest_ram: &GuestRam) -> Result<MemoryAtExit, Error> {
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|source| Error::Process {
            what: format!("cannot read /proc/{pid}/{file}"),
            source,
        })
    };
    let status = read("status")?;
    let smaps = read("smaps")?;
    let field = |name: &str| {
        status_field_kib(&status, name)
            .ok_or_else(|| Error::Vmm(format!("no {name} in /proc/{pid}/status")))
    };
    let guest = guest_rss_kib(&smaps, guest_ram);
    if let Some(path) = std::env::var_os("EXIT_RATE_DUMP_SMAPS") {
        let _ = std::fs::write(PathBuf::from(path).join(format!("smaps.{pid}")), &smaps);
    }
    Ok(MemoryAtExit {
        hwm_kib: field("VmHWM")?,
        rss_kib: field("VmRSS")?,
        guest_kib: guest,
    })
}

/// The value of a `Name:   1234 kB` line of `/proc/<pid>/status`.
///
/// ```
/// let status = "Name:\tember\nVmHWM:\t    2900 kB\nVmRSS:\t  2800 kB\n";
/// assert_eq!(ember_benches::process::status_field_kib(status, "VmHWM"), Some(2900));
/// assert_eq!(ember_benches::process::status_field_kib(status, "VmSwap"), None);
/// ```
pub fn status_field_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key != name {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The summed `Rss` of the mappings in `smaps` that `guest_ram` matches, or `None`
/// unless exactly one matches.
pub fn guest_rss_kib(smaps: &str, guest_ram: &GuestRam) -> Option<u64> {
    let mut found = Vec::new();
    let mut current: Option<bool> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
            else {
                current = None;
                continue;
            };
            // perms, offset, dev, inode, then the path (may hold spaces).
            let path: Vec<&str> = fields.skip(4).collect();
            current = Some(guest_ram.matches(&path.join(" "), (hi - lo) / 1024));
        } else if first == "Rss:" && current == Some(true) {
            found.push(fields.next()?.parse::<u64>().ok()?);
        }
    }
    (found.len() == 1).then(|| found[0])
}

/// The two VMMs run as whole processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmKind {
    /// Ember's example VMM, `ember`.
    Ember,
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
}

/// A VMM binary and how to run a guest image on it.
#[derive(Debug, Clone)]
pub struct Vmm {
    /// Which VMM.
    pub kind: VmmKind,
    /// Its executable.
    pub path: PathBuf,
    /// QEMU's `-cpu` value.
    pub qemu_cpu: String,
    /// What to call it in tables.
    pub label: String,
}

impl Vmm {
    /// `ember` at `path`, labelled with how it is linked.
    pub fn ember(path: PathBuf) -> Vmm {
        let label = match linkage(&path) {
            Some(linkage) => format!("`ember` ({linkage})"),
            None => "`ember`".to_string(),
        };
        Vmm {
            kind: VmmKind::Ember,
            path,
            qemu_cpu: String::new(),
            label,
        }
    }

    /// QEMU at `path`, run with `-cpu qemu_cpu`.
    pub fn qemu(path: PathBuf, qemu_cpu: &str) -> Vmm {
        Vmm {
            kind: VmmKind::Qemu,
            path,
            qemu_cpu: qemu_cpu.to_string(),
            label: "QEMU microvm".to_string(),
        }
    }

    /// Its label.
    pub fn name(&self) -> &str {
        &self.label
    }

    /// The arguments that run `image` (the path is a placeholder in the printed form).
    pub fn args(&self, image: &Path) -> Vec<String> {
        let image = image.display().to_string();
        let mem = GUEST_RAM_MIB.to_string();
        match self.kind {
            VmmKind::Ember => vec![
                "--kernel".into(),
                image,
                "--memory".into(),
                format!("{mem}M"),
                "--serial".into(),
                "none".into(),
            ],
            VmmKind::Qemu => [
                "-M",
                "microvm",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-display",
                "none",
                "-serial",
                "none",
                "-monitor",
                "none",
                "-m",
                &mem,
                "-accel",
                "kvm",
                "-cpu",
                &self.qemu_cpu,
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-kernel",
                &image,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }

    /// The command that runs `image`.
    pub fn command(&self, image: &Path) -> Command {
        let mut command = Command::new(&self.path);
        command.args(self.args(image));
        command
    }

    /// The exit status when the guest writes `value` to the debug-exit port: `value`
    /// for `ember`, `(value << 1) | 1` for QEMU's `isa-debug-exit`.
    pub fn debug_exit_status(&self, value: u8) -> i32 {
        match self.kind {
            VmmKind::Ember => i32::from(value),
            VmmKind::Qemu => (i32::from(value) << 1) | 1,
        }
    }

    /// How its guest RAM shows in `smaps`.
    pub fn guest_ram(&self) -> GuestRam {
        GuestRam::AnonymousOfSize(GUEST_RAM_MIB * 1024)
    }

    /// Runs `image` and checks that it ended with `expected` (an exit status).
    pub fn run(&self, image: &Path, expected: i32, traced: bool) -> Result<ProcessRun, Error> {
        let guest_ram = self.guest_ram();
        let run = run(&mut self.command(image), traced.then_some(&guest_ram))?;
        if run.ended != Ended::Exited(expected) {
            return Err(Error::Vmm(format!(
                "{} on {}: {} (expected exit status {expected}); stderr: {}",
                self.name(),
                image.display(),
                run.ended,
                run.stderr.trim()
            )));
        }
        Ok(run)
    }
}

/// `dynamic` for an ELF executable with an interpreter (`PT_INTERP`), `static-pie` or
/// `static` for one without, `None` if `path` is not a readable 64-bit ELF.
pub fn linkage(path: &Path) -> Option<&'static str> {
    let image = std::fs::read(path).ok()?;
    elf_linkage(&image)
}

/// [`linkage`] of an ELF image in memory.
///
/// ```
/// let image = ember_benches::guest::pvh_elf(0x10_0000, &[0xf4]);
/// assert_eq!(ember_benches::process::elf_linkage(&image), Some("static"));
/// assert_eq!(ember_benches::process::elf_linkage(b"MZ"), None);
/// ```
pub fn elf_linkage(image: &[u8]) -> Option<&'static str> {
    let u16_at = |off: usize| {
        Some(u16::from_le_bytes(
            image.get(off..off + 2)?.try_into().ok()?,
        ))
    };
    let u32_at = |off: usize| {
        Some(u32::from_le_bytes(
            image.get(off..off + 4)?.try_into().ok()?,
        ))
    };
    let u64_at = |off: usize| {
        Some(u64::from_le_bytes(
            image.get(off..off + 8)?.try_into().ok()?,
        ))
    };
    if image.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let e_type = u16_at(16)?;
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    let mut interp = false;
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == 3 {
            interp = true; // PT_INTERP
        }
    }
    Some(match (interp, e_type) {
        (true, _) => "dynamic",
        (false, 3) => "static-pie", // ET_DYN
        (false, _) => "static",
    })
}

/// Finds `name` in `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Whether `path` is an executable file.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Parses `ember: guest boot done after 1.234 ms` from `ember`'s stderr.
///
/// ```
/// let err = "ember: guest boot done after 3.125 ms\n";
/// assert_eq!(ember_benches::process::boot_done_ms(err), Some(3.125));
/// assert_eq!(ember_benches::process::boot_done_ms("nothing"), None);
/// ```
pub fn boot_done_ms(stderr: &str) -> Option<f64> {
    stderr.lines().find_map(|line| {
        line.strip_prefix("ember: guest boot done after ")?
            .strip_suffix(" ms")?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d7311eb000-55d73123e000 r--p 00000000 fe:01 326279                     /usr/bin/ember
Size:                332 kB
Rss:                 300 kB
7f127d400000-7f1281400000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:                  56 kB
7f1281400000-7f1281500000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                  12 kB
7ffe71fae000-7ffe71fcf000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  20 kB
";

    #[test]
    fn finds_the_one_anonymous_mapping_of_the_ram_size() {
        assert_eq!(
            guest_rss_kib(SMAPS, &GuestRam::AnonymousOfSize(65536)),
            Some(56)
        );
        assert_eq!(guest_rss_kib(SMAPS, &GuestRam::AnonymousOfSize(4096)), None);
        // Two candidates: ambiguous, so not found.
        let twice = format!("{SMAPS}{}", &SMAPS[SMAPS.find("7f127d4").unwrap()..]);
        assert_eq!(
            guest_rss_kib(&twice, &GuestRam::AnonymousOfSize(65536)),
            None
        );
    }

    #[test]
    fn vmm_memory_is_the_peak_less_guest_ram() {
        let m = MemoryAtExit {
            hwm_kib: 3000,
            rss_kib: 2900,
            guest_kib: Some(100),
        };
        assert_eq!(m.vmm_kib(), Some(2900));
        assert_eq!(
            MemoryAtExit {
                guest_kib: None,
                ..m
            }
            .vmm_kib(),
            None
        );
    }

    #[test]
    fn qemu_and_ember_command_lines() {
        let qemu = Vmm::qemu("qemu-system-x86_64".into(), "host");
        let args = qemu.args(Path::new("/tmp/g.elf")).join(" ");
        assert!(
            args.starts_with("-M microvm -nodefaults -no-user-config"),
            "{args}"
        );
        assert!(args.contains("-m 64 -accel kvm -cpu host"), "{args}");
        assert!(args.ends_with("iosize=0x04 -kernel /tmp/g.elf"), "{args}");
        assert_eq!(qemu.debug_exit_status(0), 1);
        assert_eq!(qemu.debug_exit_status(123), 247);
        let ember = Vmm::ember("/nonexistent/ember".into());
        assert_eq!(ember.name(), "`ember`");
        assert_eq!(
            ember.args(Path::new("g.elf")).join(" "),
            "--kernel g.elf --memory 64M --serial none"
        );
        assert_eq!(ember.debug_exit_status(7), 7);
    }

    #[test]
    fn a_traced_process_reports_its_memory_at_exit() {
        let Some(sh) = which("sh") else { return };
        let run = run(
            Command::new(sh).args(["-c", "echo hi >&2; exit 3"]),
            Some(&GuestRam::AnonymousOfSize(1 << 40)),
        )
        .unwrap();
        assert_eq!(run.ended, Ended::Exited(3));
        assert_eq!(run.stderr, "hi\n");
        let m = run.memory.unwrap();
        assert!(m.hwm_kib >= m.rss_kib && m.rss_kib > 0, "{m:?}");
        assert_eq!(m.guest_kib, None);
        let untraced = super::run(Command::new("true").arg("x"), None);
        if let Ok(untraced) = untraced {
            assert_eq!(untraced.ended, Ended::Exited(0));
            assert!(untraced.memory.is_none());
        }
    }
}
