//! `ember` on a terminal: run under a pseudo-terminal (stdin, stdout and stderr all on
//! its slave side, which is also `ember`'s controlling terminal), it puts the terminal
//! in raw mode while the guest runs, gives it back as it was on every way out, and
//! quits on Ctrl-A x.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ember_guests::asm::assemble;
use ember_guests::elf::{flat_elf, GUEST_LOAD_ADDR};
use ember_guests::testing::kvm_available;
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// How long any one step may take before the test gives up.
const LIMIT: Duration = Duration::from_secs(30);

/// A guest assembled here, wrapped as an ELF kernel in a temporary file.
fn guest_kernel(
    dir: &tempfile::TempDir,
    name: &str,
    build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> PathBuf {
    let code = assemble(GUEST_LOAD_ADDR, build).unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, flat_elf(GUEST_LOAD_ADDR, &code, 0)).unwrap();
    path
}

/// How [`reader_guest`] ends once it has its bytes.
#[derive(Clone, Copy)]
enum Then {
    /// Through the debug-exit port, with the bytes' sum (mod 256) as the status.
    Exit,
    /// With an i8042 reset (status 0).
    Reset,
    /// With a triple fault (`ud2` with no IDT): an error.
    Fault,
}

/// Polls COM1 for `count` bytes, then ends as `then` says.
fn reader_guest(dir: &tempfile::TempDir, name: &str, count: u32, then: Then) -> PathBuf {
    guest_kernel(dir, name, |a| {
        let mut next = a.create_label();
        let mut wait = a.create_label();
        a.xor(ebx, ebx)?;
        a.mov(ecx, count)?;
        a.set_label(&mut next)?;
        a.mov(dx, 0x3fdu32)?;
        a.set_label(&mut wait)?;
        a.in_(al, dx)?;
        a.test(al, 1u32)?;
        a.jz(wait)?;
        a.mov(dx, 0x3f8u32)?;
        a.in_(al, dx)?;
        a.add(bl, al)?;
        a.dec(ecx)?;
        a.jnz(next)?;
        match then {
            Then::Exit => {}
            Then::Reset => {
                a.mov(al, 0xfeu32)?;
                a.out(0x64, al)?;
            }
            Then::Fault => a.ud2()?,
        }
        a.mov(al, bl)?;
        a.out(0xf4, al)?;
        a.hlt()
    })
}

/// Halts with interrupts off, for ever (cheap: the vCPU sleeps in KVM).
fn halting_guest(dir: &tempfile::TempDir) -> PathBuf {
    guest_kernel(dir, "halt", |a| {
        let mut again = a.create_label();
        a.cli()?;
        a.set_label(&mut again)?;
        a.hlt()?;
        a.jmp(again)
    })
}

/// A termios with every field zero, for the C calls to fill.
fn zeroed_termios() -> libc::termios {
    // SAFETY: termios is plain integers and arrays; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

fn tcgetattr(fd: &File) -> libc::termios {
    let mut t = zeroed_termios();
    // SAFETY: `fd` is an open terminal; `t` is a valid termios to write.
    let rc = unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) };
    assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
    t
}

fn tcsetattr(fd: &File, t: &libc::termios) {
    // SAFETY: `fd` is an open terminal; `t` is a valid termios, only read.
    let rc = unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, t) };
    assert_eq!(rc, 0, "tcsetattr: {}", std::io::Error::last_os_error());
}

/// The settings that matter, for comparing and printing.
fn settings(t: &libc::termios) -> (u32, u32, u32, u32, Vec<u8>) {
    (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc.to_vec())
}

/// What `ember` should make of `original`: `cfmakeraw`, with the output flags kept.
fn expected_raw(original: &libc::termios) -> libc::termios {
    let mut t = *original;
    // SAFETY: `t` is a valid termios; cfmakeraw only rewrites its fields.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_oflag = original.c_oflag;
    t
}

/// A pseudo-terminal; the test keeps both sides open, so the slave's settings
/// outlive `ember`, and collects everything written to the slave.
struct Pty {
    master: File,
    slave: File,
    output: Vec<u8>,
}

impl Pty {
    /// A new pseudo-terminal whose slave settings are the defaults with a few
    /// changes, so that "restored" cannot pass by chance as "reset to the defaults".
    fn new() -> Pty {
        // SAFETY: posix_openpt opens a new descriptor; the result is checked.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let master = unsafe { File::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `fd` is a pty master; `name` is writable for its full length.
        unsafe {
            assert_eq!(libc::grantpt(fd), 0, "grantpt");
            assert_eq!(libc::unlockpt(fd), 0, "unlockpt");
            assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        }
        // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path.to_str().unwrap())
            .unwrap();
        // SAFETY: fcntl on our own descriptor; the flags are only or-ed in.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            assert!(flags >= 0);
            assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK), 0);
        }
        let mut t = tcgetattr(&slave);
        t.c_iflag ^= libc::IUTF8;
        t.c_lflag &= !libc::ECHOCTL;
        t.c_cc[libc::VERASE] = 0x08;
        t.c_cc[libc::VKILL] = 0x0b;
        tcsetattr(&slave, &t);
        Pty {
            master,
            slave,
            output: Vec::new(),
        }
    }

    fn termios(&self) -> libc::termios {
        tcgetattr(&self.slave)
    }

    /// Types `bytes` on the terminal.
    fn type_in(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Collects whatever has been written to the terminal so far.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.master.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self.output.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EIO: no slave open any more.
                Err(_) => return,
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

/// `ember` running on a [`Pty`]; killed if the test fails first.
struct Ember {
    child: Option<Child>,
    pty: Pty,
    original: libc::termios,
}

impl Ember {
    fn start(args: &[&str]) -> Ember {
        let pty = Pty::new();
        let original = pty.termios();
        let on_pty = || Stdio::from(pty.slave.try_clone().unwrap());
        let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
        command
            .args(args)
            .stdin(on_pty())
            .stdout(on_pty())
            .stderr(on_pty());
        // SAFETY: between fork and exec only async-signal-safe system calls run:
        // setsid, then ioctl on stdin (the slave) to make it the controlling terminal,
        // so that keys such as Ctrl-C would raise signals if ISIG were on.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("cannot start ember");
        Ember {
            child: Some(child),
            pty,
            original,
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("ember already waited for")
    }

    /// Waits until `done` holds, collecting output; fails if `ember` exits first or
    /// `LIMIT` passes.
    fn wait_for(&mut self, what: &str, mut done: impl FnMut(&Pty) -> bool) {
        let start = Instant::now();
        loop {
            self.pty.drain();
            if done(&self.pty) {
                return;
            }
            if let Some(status) = self.child().try_wait().unwrap() {
                self.pty.drain();
                panic!(
                    "ember exited ({status}) before {what}; output:\n{}",
                    self.pty.text()
                );
            }
            assert!(
                start.elapsed() < LIMIT,
                "no {what} after {LIMIT:?}; output:\n{}",
                self.pty.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the terminal is in raw mode, and checks it is exactly what
    /// `ember` should have made of the original settings.
    fn wait_for_raw_mode(&mut self) {
        self.wait_for("raw mode", |pty| pty.termios().c_lflag & libc::ICANON == 0);
        let raw = self.pty.termios();
        assert_eq!(settings(&raw), settings(&expected_raw(&self.original)));
        // Spelled out: no echo, no line editing, no keyboard signals, CR stays CR,
        // output processing as before.
        assert_eq!(
            raw.c_lflag & (libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN),
            0
        );
        assert_eq!(raw.c_iflag & (libc::ICRNL | libc::IXON), 0);
        assert_eq!(raw.c_oflag, self.original.c_oflag);
        assert_ne!(raw.c_oflag & libc::OPOST, 0);
    }

    /// Waits for `ember` to exit; returns its status, with all its output collected.
    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        let mut child = self.child.take().expect("ember already waited for");
        loop {
            self.pty.drain();
            if let Some(status) = child.try_wait().unwrap() {
                self.pty.drain();
                assert!(!self.pty.text().contains("panicked"), "{}", self.pty.text());
                return status;
            }
            if start.elapsed() > LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ember still running after {LIMIT:?}; output:\n{}",
                    self.pty.text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn assert_restored(&self, when: &str) {
        assert_eq!(
            settings(&self.pty.termios()),
            settings(&self.original),
            "terminal not restored {when}; output:\n{}",
            self.pty.text()
        );
    }

    fn signal(&mut self, signo: i32) {
        let pid = self.child().id() as libc::pid_t;
        // SAFETY: kill(2) on our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(pid, signo) }, 0);
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn raw_while_the_guest_runs_and_restored_when_it_exits() {
    if !kvm_available("raw_while_the_guest_runs_and_restored_when_it_exits") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = reader_guest(&dir, "read2", 2, Then::Exit);
    let mut ember = Ember::start(&["--kernel", kernel.to_str().unwrap()]);
    ember.wait_for_raw_mode();
    // Ctrl-C reaches the guest as a byte (no SIGINT: that would end ember with 130),
    // and CR stays CR (no ICRNL): 3 + 13.
    ember.pty.type_in(b"\x03\r");
    let status = ember.wait_exit();
    assert_eq!(status.code(), Some(16), "{}", ember.pty.text());
    ember.assert_restored("after the guest exited");
    // Nothing was echoed.
    assert_eq!(ember.pty.text(), "");
}

#[test]
fn restored_after_a_reset() {
    if !kvm_available("restored_after_a_reset") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = reader_guest(&dir, "read1-reset", 1, Then::Reset);
    let mut ember = Ember::start(&["--kernel", kernel.to_str().unwrap()]);
    ember.wait_for_raw_mode();
    // Without the reset the guest would exit with 65.
    ember.pty.type_in(b"A");
    let status = ember.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", ember.pty.text());
    ember.assert_restored("after the reset");
}

#[test]
fn demo_guest_output_keeps_its_line_breaks() {
    if !kvm_available("demo_guest_output_keeps_its_line_breaks") {
        return;
    }
    let mut ember = Ember::start(&[]);
    let status = ember.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", ember.pty.text());
    // The demo guest ends lines with a bare \n; output processing (kept in raw mode)
    // turns it into \r\n.
    assert!(
        ember
            .pty
            .text()
            .contains("Ember demo guest: 1 of 1 vCPUs online, APIC IDs: 0\r\n"),
        "{:?}",
        ember.pty.text()
    );
    ember.assert_restored("after the demo guest");
}

#[test]
fn ctrl_a_x_quits_promptly_with_status_0() {
    if !kvm_available("ctrl_a_x_quits_promptly_with_status_0") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Had Ctrl-A or x reached the guest, it would exit with 1 or 120.
    let kernel = reader_guest(&dir, "read1", 1, Then::Exit);
    let mut ember = Ember::start(&["--kernel", kernel.to_str().unwrap()]);
    ember.wait_for_raw_mode();
    // Ctrl-A h lists the escapes and the guest goes on.
    ember.pty.type_in(b"\x01h");
    ember.wait_for("help", |pty| pty.text().contains("Ctrl-A x"));
    let text = ember.pty.text();
    assert!(
        text.contains("Ctrl-A Ctrl-A  send Ctrl-A to the guest"),
        "{text}"
    );
    assert!(ember.child().try_wait().unwrap().is_none(), "{text}");

    let sent = Instant::now();
    ember.pty.type_in(b"\x01x");
    // By the time the message shows, the terminal is already restored.
    ember.wait_for("the quit message", |pty| {
        pty.text().contains("ember: terminated (Ctrl-A x)")
    });
    ember.assert_restored("when the quit message showed");
    let status = ember.wait_exit();
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", ember.pty.text());
    ember.assert_restored("after Ctrl-A x");
}

#[test]
fn ctrl_a_ctrl_a_sends_one_ctrl_a_and_other_bytes_pass() {
    if !kvm_available("ctrl_a_ctrl_a_sends_one_ctrl_a_and_other_bytes_pass") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = reader_guest(&dir, "read4", 4, Then::Exit);
    let mut ember = Ember::start(&["--kernel", kernel.to_str().unwrap()]);
    ember.wait_for_raw_mode();
    // Ctrl-A Ctrl-A -> 1; Ctrl-A c -> 1, 'c'; then 'z': 1 + 1 + 99 + 122.
    ember.pty.type_in(b"\x01\x01\x01cz");
    let status = ember.wait_exit();
    assert_eq!(status.code(), Some(223), "{}", ember.pty.text());
    ember.assert_restored("after the guest exited");
}

#[test]
fn sigterm_and_sigint_restore_the_terminal() {
    if !kvm_available("sigterm_and_sigint_restore_the_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = halting_guest(&dir);
    for (signo, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let mut ember = Ember::start(&["--kernel", kernel.to_str().unwrap()]);
        ember.wait_for_raw_mode();
        ember.signal(signo);
        let exit = ember.wait_exit();
        assert_eq!(exit.code(), Some(status), "{}", ember.pty.text());
        ember.assert_restored(&format!("after signal {signo}"));
    }
}

#[test]
fn an_error_is_reported_on_a_restored_terminal() {
    if !kvm_available("an_error_is_reported_on_a_restored_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Runs until it gets a byte, then triple-faults.
    let kernel = reader_guest(&dir, "read1-fault", 1, Then::Fault);
    let mut ember = Ember::start(&["--kernel", kernel.to_str().unwrap()]);
    ember.wait_for_raw_mode();
    ember.pty.type_in(b"!");
    ember.wait_for("the error line", |pty| pty.text().contains("\r\n"));
    ember.assert_restored("when the error line showed");
    let status = ember.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", ember.pty.text());
    let text = ember.pty.text();
    // One line, and nothing else.
    assert_eq!(
        text,
        "ember: error: vCPU 0: the guest triple-faulted (KVM_EXIT_SHUTDOWN)\r\n"
    );
    ember.assert_restored("after the error");
}

#[test]
fn a_pipe_on_stdin_has_no_escapes() {
    if !kvm_available("a_pipe_on_stdin_has_no_escapes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = reader_guest(&dir, "read2", 2, Then::Exit);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["--kernel", kernel.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ember");
    // Not a terminal: Ctrl-A x is two bytes for the guest, 1 + 120.
    child.stdin.take().unwrap().write_all(b"\x01x").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(121), "{stderr}");
    assert!(!stderr.contains("terminated"), "{stderr}");
}
