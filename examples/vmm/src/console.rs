//! The interactive console: when COM1 is on stdio and stdin is a terminal, the
//! terminal goes into raw mode for as long as the VM runs, and Ctrl-A starts an escape
//! sequence, as in QEMU's `-nographic`/`-serial mon:stdio`.
//!
//! Raw mode is `cfmakeraw` except for output processing: no echo, no line editing, no
//! signals from the keyboard (Ctrl-C, Ctrl-Z and Ctrl-\ reach the guest as bytes), no
//! input translation (CR stays CR) or flow control, 8-bit characters, reads return
//! each byte as it arrives. The output flags are left as they were, as QEMU's stdio
//! backend does: the guest's `\r\n` still shows as one line break, a guest that sends
//! a bare `\n` (the demo guest) still starts lines at the left edge, and so do
//! `ember`'s own log lines on stderr.
//!
//! The original settings come back when the [`RawTerminal`] guard is dropped, which the
//! run loop does as soon as it stops (the VM ended, an error, SIGINT or SIGTERM,
//! Ctrl-A x), before anything else is printed; and, through a panic hook, when any
//! thread panics (the release build aborts on panic, so no destructor would run).
//!
//! Escapes ([`EscapeParser`]): Ctrl-A x quits `ember` (exit status 0, as QEMU's
//! Ctrl-A x), Ctrl-A Ctrl-A sends one Ctrl-A to the guest, Ctrl-A h (or `?`) prints
//! the list of escapes, and Ctrl-A followed by any other byte sends both bytes to the
//! guest (QEMU drops both; forwarding them loses nothing the user typed).

use std::io;
use std::os::fd::RawFd;
use std::sync::{Mutex, Once};

/// The escape byte: Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// What the escapes do, printed by Ctrl-A h. Lines end in `\r\n` so they display
/// right whatever the terminal's output flags.
pub const HELP: &str = "\r\nember console escapes:\r\n  \
     Ctrl-A x       quit ember (exit status 0)\r\n  \
     Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n  \
     Ctrl-A h, ?    print this help\r\n";

/// One thing the console input asks for, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Bytes for the guest's serial port.
    Guest(Vec<u8>),
    /// Print [`HELP`].
    Help,
    /// End `ember`. Input after it is not looked at.
    Quit,
}

/// Splits console input into bytes for the guest and escape commands.
///
/// A pure state machine: the only state is whether the last byte fed was an unanswered
/// Ctrl-A, which carries over from one [`feed`](Self::feed) to the next (a read can
/// end between the two bytes of an escape).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EscapeParser {
    escaped: bool,
}

impl EscapeParser {
    /// A parser with no escape pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `input`; returns what it asks for, in order, with consecutive guest bytes
    /// in one [`ConsoleEvent::Guest`]. Stops at [`ConsoleEvent::Quit`]: the bytes
    /// after it are dropped.
    pub fn feed(&mut self, input: &[u8]) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        let mut guest = Vec::new();
        for &byte in input {
            if !self.escaped {
                if byte == ESCAPE {
                    self.escaped = true;
                } else {
                    guest.push(byte);
                }
                continue;
            }
            self.escaped = false;
            match byte {
                ESCAPE => guest.push(ESCAPE),
                b'x' => {
                    flush(&mut guest, &mut events);
                    events.push(ConsoleEvent::Quit);
                    return events;
                }
                b'h' | b'?' => {
                    flush(&mut guest, &mut events);
                    events.push(ConsoleEvent::Help);
                }
                other => guest.extend_from_slice(&[ESCAPE, other]),
            }
        }
        flush(&mut guest, &mut events);
        events
    }
}

/// Moves `guest` into `events` as one event, if it holds anything.
fn flush(guest: &mut Vec<u8>, events: &mut Vec<ConsoleEvent>) {
    if !guest.is_empty() {
        events.push(ConsoleEvent::Guest(std::mem::take(guest)));
    }
}

/// `original` switched to raw mode (see the module docs): `cfmakeraw` with the output
/// flags kept.
pub fn raw_mode(original: &libc::termios) -> libc::termios {
    let mut t = *original;
    t.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    t.c_cflag &= !(libc::CSIZE | libc::PARENB);
    t.c_cflag |= libc::CS8;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    t
}

/// The terminal in raw mode and its original settings, for the panic hook.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);
static PANIC_HOOK: Once = Once::new();

/// Applies `termios` to `fd` at once (not waiting for output to drain: a terminal
/// nobody reads must not hang `ember`).
fn set_termios(fd: RawFd, termios: &libc::termios) -> io::Result<()> {
    // SAFETY: `termios` is a valid, initialised termios; tcsetattr only reads it.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Restores the saved settings, if a terminal is in raw mode. Never blocks: a panic
/// while [`SAVED`] is locked leaves the terminal to the guard.
fn restore_saved() {
    if let Ok(saved) = SAVED.try_lock() {
        if let Some((fd, original)) = *saved {
            let _ = set_termios(fd, &original);
        }
    }
}

/// A terminal in raw mode; dropping it restores the original settings.
#[derive(Debug)]
pub struct RawTerminal {
    fd: RawFd,
    original: libc::termios,
}

impl RawTerminal {
    /// Puts standard input in raw mode if it is a terminal. `None` (and a log line
    /// saying why, unless stdin is simply not a terminal) when nothing was changed.
    pub fn stdin() -> Option<RawTerminal> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        match RawTerminal::enter(fd) {
            Ok(terminal) => {
                log::info!(
                    "console: terminal in raw mode; Ctrl-A x quits, Ctrl-A h lists the escapes"
                );
                Some(terminal)
            }
            Err(e) => {
                log::warn!("console: cannot put the terminal in raw mode: {e}");
                None
            }
        }
    }

    /// Puts the terminal `fd` in raw mode.
    pub fn enter(fd: RawFd) -> io::Result<RawTerminal> {
        // SAFETY: zero is a valid bit pattern for termios (plain integers and arrays);
        // tcgetattr overwrites it.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `original` is a valid termios to write to.
        if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
            return Err(io::Error::last_os_error());
        }
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // The panic message then lands on a usable terminal.
                restore_saved();
                previous(info);
            }));
        });
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, original));
        if let Err(e) = set_termios(fd, &raw_mode(&original)) {
            *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Err(e);
        }
        Ok(RawTerminal { fd, original })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(e) = set_termios(self.fd, &self.original) {
            log::warn!("console: cannot restore the terminal's settings: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConsoleEvent::{Guest, Help, Quit};

    fn feed(input: &[u8]) -> Vec<ConsoleEvent> {
        EscapeParser::new().feed(input)
    }

    #[test]
    fn plain_bytes_go_to_the_guest_in_one_event() {
        assert_eq!(feed(b"ls -l\r"), vec![Guest(b"ls -l\r".to_vec())]);
        // Ctrl-C, Ctrl-Z, Ctrl-\ and NUL are just bytes.
        assert_eq!(
            feed(&[0x03, 0x1a, 0x1c, 0]),
            vec![Guest(vec![0x03, 0x1a, 0x1c, 0])]
        );
        assert_eq!(feed(b""), vec![]);
    }

    #[test]
    fn ctrl_a_x_quits_and_drops_what_follows() {
        assert_eq!(feed(b"\x01x"), vec![Quit]);
        assert_eq!(
            feed(b"ab\x01xcd\x01\x01"),
            vec![Guest(b"ab".to_vec()), Quit]
        );
        // Only lower-case x, as in QEMU.
        assert_eq!(feed(b"\x01X"), vec![Guest(b"\x01X".to_vec())]);
    }

    #[test]
    fn ctrl_a_ctrl_a_sends_one_ctrl_a() {
        assert_eq!(feed(b"\x01\x01"), vec![Guest(vec![ESCAPE])]);
        assert_eq!(
            feed(b"a\x01\x01b\x01\x01\x01\x01"),
            vec![Guest(b"a\x01b\x01\x01".to_vec())]
        );
        // The Ctrl-A sent on does not start another escape.
        assert_eq!(feed(b"\x01\x01x"), vec![Guest(b"\x01x".to_vec())]);
    }

    #[test]
    fn ctrl_a_and_another_byte_sends_both() {
        assert_eq!(feed(b"\x01c"), vec![Guest(b"\x01c".to_vec())]);
        assert_eq!(feed(b"\x01\x03"), vec![Guest(vec![ESCAPE, 0x03])]);
        assert_eq!(feed(b"\x01\r"), vec![Guest(b"\x01\r".to_vec())]);
    }

    #[test]
    fn ctrl_a_h_or_question_mark_asks_for_help_in_order() {
        assert_eq!(feed(b"\x01h"), vec![Help]);
        assert_eq!(
            feed(b"a\x01?b\x01hc"),
            vec![
                Guest(b"a".to_vec()),
                Help,
                Guest(b"b".to_vec()),
                Help,
                Guest(b"c".to_vec())
            ]
        );
    }

    #[test]
    fn an_escape_split_across_reads_still_counts() {
        let mut p = EscapeParser::new();
        assert_eq!(p.feed(b"ab\x01"), vec![Guest(b"ab".to_vec())]);
        assert_eq!(p.feed(b"x"), vec![Quit]);

        let mut p = EscapeParser::new();
        assert_eq!(p.feed(b"\x01"), vec![]);
        assert_eq!(p.feed(b"\x01"), vec![Guest(vec![ESCAPE])]);
        assert_eq!(p.feed(b"x"), vec![Guest(b"x".to_vec())]);

        let mut p = EscapeParser::new();
        assert_eq!(p.feed(b"\x01"), vec![]);
        assert_eq!(p.feed(b"q"), vec![Guest(b"\x01q".to_vec())]);
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_guest_bytes() {
        let input = b"a\x01\x01b\x01cd\x01h\x01\x01\x01e\x01x\x01\x01";
        let whole = EscapeParser::new().feed(input);
        let guest_bytes = |events: &[ConsoleEvent]| -> Vec<u8> {
            events
                .iter()
                .flat_map(|e| match e {
                    Guest(b) => b.clone(),
                    _ => Vec::new(),
                })
                .collect()
        };
        assert_eq!(guest_bytes(&whole), b"a\x01b\x01cd\x01\x01e".to_vec());
        assert_eq!(whole.last(), Some(&Quit));
        for cut in 0..=input.len() {
            let mut p = EscapeParser::new();
            let mut events = p.feed(&input[..cut]);
            if events.last() != Some(&Quit) {
                events.extend(p.feed(&input[cut..]));
            }
            assert_eq!(guest_bytes(&events), guest_bytes(&whole), "cut at {cut}");
            assert_eq!(
                events.iter().filter(|e| **e == Help).count(),
                1,
                "cut at {cut}"
            );
            assert_eq!(events.last(), Some(&Quit), "cut at {cut}");
        }
    }

    /// A new pseudo-terminal: (master, slave).
    fn pty() -> (std::fs::File, std::fs::File) {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt opens a new descriptor; the result is checked.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(fd >= 0, "posix_openpt: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let master = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `fd` is a pty master; `name` is writable for its full length.
        unsafe {
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        }
        // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.to_str().unwrap())
            .unwrap();
        (master, slave)
    }

    fn settings(fd: RawFd) -> (u32, u32, u32, u32, Vec<u8>) {
        // SAFETY: zero is a valid termios.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is an open terminal; `t` is a valid termios to write.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc.to_vec())
    }

    #[test]
    fn the_guard_and_a_panic_restore_the_terminal() {
        use std::os::fd::AsRawFd;
        let (_master, slave) = pty();
        let fd = slave.as_raw_fd();
        let original = settings(fd);
        assert_ne!(original.3 & libc::ICANON, 0);

        let terminal = RawTerminal::enter(fd).unwrap();
        assert_eq!(settings(fd).3 & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        drop(terminal);
        assert_eq!(settings(fd), original);

        // A panic on any thread restores the terminal before its message is printed,
        // while the guard is still alive (the release build aborts on panic).
        let terminal = RawTerminal::enter(fd).unwrap();
        assert_ne!(settings(fd), original);
        let panicked = std::thread::spawn(|| panic!("a panic on purpose, to test the hook"))
            .join()
            .is_err();
        assert!(panicked);
        assert_eq!(settings(fd), original);
        drop(terminal);
        assert_eq!(settings(fd), original);
    }

    #[test]
    fn a_file_is_not_a_terminal() {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(RawTerminal::enter(file.as_raw_fd()).is_err());
    }

    #[test]
    fn raw_mode_is_cfmakeraw_with_the_output_flags_kept() {
        // SAFETY: zero is a valid termios.
        let mut cooked: libc::termios = unsafe { std::mem::zeroed() };
        cooked.c_iflag = libc::ICRNL | libc::IXON | libc::BRKINT | libc::IUTF8;
        cooked.c_oflag = libc::OPOST | libc::ONLCR;
        cooked.c_cflag = libc::CS7 | libc::PARENB | libc::CREAD;
        cooked.c_lflag = libc::ISIG
            | libc::ICANON
            | libc::ECHO
            | libc::ECHOE
            | libc::ECHOK
            | libc::ECHONL
            | libc::IEXTEN;
        cooked.c_cc[libc::VMIN] = 0;
        cooked.c_cc[libc::VTIME] = 5;
        cooked.c_cc[libc::VINTR] = 3;
        let raw = raw_mode(&cooked);
        assert_eq!(raw.c_oflag, libc::OPOST | libc::ONLCR);
        assert_eq!(raw.c_iflag, libc::IUTF8);
        assert_eq!(raw.c_cflag, libc::CS8 | libc::CREAD);
        assert_eq!(raw.c_lflag & (libc::ISIG | libc::ICANON | libc::ECHO), 0);
        assert_eq!(raw.c_lflag & (libc::ECHONL | libc::IEXTEN), 0);
        assert_eq!(raw.c_cc[libc::VMIN], 1);
        assert_eq!(raw.c_cc[libc::VTIME], 0);
        assert_eq!(raw.c_cc[libc::VINTR], 3);

        // Apart from the output flags, it is exactly what libc's cfmakeraw gives.
        let mut reference = cooked;
        // SAFETY: `reference` is a valid termios; cfmakeraw only rewrites its flags.
        unsafe { libc::cfmakeraw(&mut reference) };
        reference.c_oflag = cooked.c_oflag;
        assert_eq!(raw.c_iflag, reference.c_iflag);
        assert_eq!(raw.c_cflag, reference.c_cflag);
        assert_eq!(raw.c_lflag, reference.c_lflag);
        assert_eq!(raw.c_cc, reference.c_cc);
    }
}
