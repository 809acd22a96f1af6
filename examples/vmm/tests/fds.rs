//! Every file descriptor `ember` opens is close-on-exec, so none leaks into a process it
//! (or a library it uses) might start: checked from outside, in `/proc/PID/fdinfo`, on
//! a running VM with a virtio disk and a virtio-rng device (both rate-limited, for their
//! timerfds) and, where a tap can be made (root, `/dev/net/tun`, iproute2; in a private
//! network namespace, deleted afterwards), a virtio-net card, once the guest has
//! activated the disk and is waiting. Without a tap the net part is skipped with a
//! loud message, unless `EMBER_REQUIRE_TAP=1`.
//!
//! `ember` starts with only stdin, stdout and stderr open (every other descriptor the
//! test process holds is made close-on-exec in the child before it runs `ember`), so
//! every descriptor above 2 is one `ember` opened itself.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ember_guests::rust_guest::build_guest;
use ember_guests::testing::{kvm_available, tap_part_unavailable, TapNamespace};

/// `O_CLOEXEC` as `/proc/PID/fdinfo` shows it in `flags:` (octal).
const O_CLOEXEC: u32 = 0o2000000;
/// `CLOSE_RANGE_CLOEXEC` from `<linux/close_range.h>`.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// What the guest's `blk-flush` scenario prints once it has written and flushed, before
/// it waits forever.
const FLUSHED_LINE: &str = "virtio-guest: blk-flush flushed";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const TAP: &str = "efds0";

/// Kills the child when dropped, so a failing assertion leaves no VM running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One open descriptor of a process: what it is and its open flags.
#[derive(Debug)]
struct OpenFd {
    target: String,
    flags: u32,
}

/// Every descriptor above 2 that process `pid` has open.
fn open_fds(pid: u32) -> BTreeMap<u32, OpenFd> {
    let mut fds = BTreeMap::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("cannot list /proc/PID/fd");
    for entry in dir {
        let entry = entry.unwrap();
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if fd <= 2 {
            continue;
        }
        // A descriptor closed since the listing is simply gone.
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or_else(|| panic!("no flags in /proc/{pid}/fdinfo/{fd}:\n{info}"));
        let target = std::fs::read_link(entry.path())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("({e})"));
        fds.insert(fd, OpenFd { target, flags });
    }
    fds
}

fn disk_image(dir: &Path) -> PathBuf {
    let path = dir.join("fds.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

#[test]
fn every_fd_of_a_running_vm_is_close_on_exec() {
    const TEST: &str = "every_fd_of_a_running_vm_is_close_on_exec";
    if !kvm_available(TEST) {
        return;
    }
    let guest = build_guest("virtio-guest").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(dir.path());
    let netns = match TapNamespace::create("fds", TAP) {
        Ok(ns) => Some(ns),
        Err(why) => {
            tap_part_unavailable(TEST, "the virtio-net part", why);
            None
        }
    };
    // `ip netns exec` execs ember in place: the child's pid is ember's.
    let mut command = match &netns {
        Some(ns) => {
            let mut c = ns.exec(env!("CARGO_BIN_EXE_ember"));
            c.args(["--net", &format!("tap={TAP}")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_ember")),
    };
    command
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--disk",
            &format!(
                "path={},ops_size=100000,ops_refill_time=1000",
                image.display()
            ),
            "--rng",
            "bw_size=1048576,bw_refill_time=1000",
            "--cmdline",
            "console=ttyS0 ember.test=blk-flush",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec, and makes only the close_range
    // system call, which is async-signal-safe and touches no memory: descriptors the
    // test process holds without O_CLOEXEC (a jobserver pipe, say) are not inherited.
    unsafe {
        command.pre_exec(|| {
            let ret = libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            if ret != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = KillOnDrop(command.spawn().expect("cannot start ember"));
    let pid = child.0.id();
    let stdout = child.0.stdout.take().unwrap();
    let mut stderr = child.0.stderr.take().unwrap();
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let mut seen = Vec::new();
    let waiting = loop {
        match lines.recv_timeout(BOOT_TIMEOUT) {
            Ok(line) if line == FLUSHED_LINE => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let fds = if waiting {
        open_fds(pid)
    } else {
        BTreeMap::new()
    };
    drop(child);
    let stderr = stderr.join().unwrap_or_default();
    assert!(
        waiting,
        "the guest never reached {FLUSHED_LINE:?}\nstdout:\n{}\nstderr:\n{stderr}",
        seen.join("\n")
    );

    let listing: String = fds
        .iter()
        .map(|(fd, f)| format!("  {fd}: {} flags {:o}\n", f.target, f.flags))
        .collect();
    // The check covers what matters: KVM, the disk, eventfds, epoll sets, timerfds
    // (`/dev/kvm` itself is closed once the VM exists).
    let count = |what: &str| fds.values().filter(|f| f.target.contains(what)).count();
    let disk = image.display().to_string();
    for (what, at_least) in [
        ("anon_inode:kvm-vm", 1),
        ("anon_inode:kvm-vcpu", 1),
        (disk.as_str(), 1),
        ("anon_inode:[eventfd]", 6),
        ("anon_inode:[eventpoll]", 2),
        ("anon_inode:[timerfd]", 1),
        ("/dev/net/tun", usize::from(netns.is_some())),
    ] {
        assert!(
            count(what) >= at_least,
            "expected at least {at_least} fds on {what}; ember has:\n{listing}"
        );
    }
    let leaking: Vec<String> = fds
        .iter()
        .filter(|(_, f)| f.flags & O_CLOEXEC == 0)
        .map(|(fd, f)| format!("{fd} ({}, flags {:o})", f.target, f.flags))
        .collect();
    assert!(
        leaking.is_empty(),
        "fds without O_CLOEXEC: {}\nall fds:\n{listing}",
        leaking.join(", ")
    );
}
