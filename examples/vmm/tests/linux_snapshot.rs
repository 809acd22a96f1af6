//! A Linux guest (Ember's small kernel and the busybox initramfs) with a shell on the
//! console is paused, snapshotted and killed; a new `ember` restores it, and the shell
//! still has the variable it was given before the snapshot, runs commands typed into
//! the new process's console, and powers off with status 0.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ember_guests::testing::{
    api_request, guest_script_path, kvm_available, linux_unavailable, wait_for_socket, LiveChild,
};

const TEST: &str = "a_linux_shell_keeps_its_state_across_snapshot_kill_and_restore";

/// Minutes of emulated kernel code on nested hosts (the small kernel reaches its shell
/// in about a minute there), seconds on hardware KVM.
const BOOT_LIMIT: Duration = Duration::from_secs(15 * 60);

fn guest() -> Option<(PathBuf, PathBuf)> {
    if !kvm_available(TEST) {
        return None;
    }
    let kernel = guest_script_path("small-kernel.sh", "SMALL_KERNEL_VMLINUX");
    let initramfs = guest_script_path("linux-guest.sh", "INITRAMFS");
    match (kernel, initramfs) {
        (Ok(k), Ok(i)) => Some((k, i)),
        (Err(e), _) | (_, Err(e)) => {
            linux_unavailable(TEST, &e);
            None
        }
    }
}

fn api_ok(socket: &std::path::Path, method: &str, path: &str, body: &str) {
    let (status, reply) = api_request(socket, method, path, Some(body))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert_eq!(status, 204, "{method} {path}: {reply}");
}

#[test]
fn a_linux_shell_keeps_its_state_across_snapshot_kill_and_restore() {
    let Some((kernel, initramfs)) = guest() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initramfs)
        .args(["--cpus", "1", "--memory", "256M"])
        .args(["--cmdline", "console=ttyS0 panic=1 ember.shell"])
        .arg("--api-sock")
        .arg(&socket);
    let mut linux = LiveChild::spawn(&mut command);
    assert!(
        wait_for_socket(&socket, Duration::from_secs(30)),
        "{}",
        linux.context()
    );
    linux
        .wait_for_line("EMBER: shell on the console", 0, BOOT_LIMIT)
        .unwrap_or_else(|| panic!("no shell\n{}", linux.context()));
    // The shell's state: a variable, and a file in the initramfs's tmpfs.
    linux
        .send(b"X=snap$((6*7)); echo before > /tmp/f; echo marker-$X\n")
        .unwrap();
    let (at, _) = linux
        .wait_for_line("marker-snap42", 0, Duration::from_secs(300))
        .unwrap_or_else(|| panic!("the shell did not answer\n{}", linux.context()));
    api_ok(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let body = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{0}/vmstate", "mem_file_path": "{0}/memory"}}"#,
        snap.display()
    );
    api_ok(&socket, "PUT", "/snapshot/create", &body);
    linux.kill();
    assert!(at > 0);

    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command.arg("--restore").arg(&snap);
    let mut restored = LiveChild::spawn(&mut command);
    restored.send(b"echo after-$X-$(cat /tmp/f)\n").unwrap();
    restored
        .wait_for_line("after-snap42-before", 0, Duration::from_secs(300))
        .unwrap_or_else(|| panic!("the restored shell lost its state\n{}", restored.context()));
    restored.send(b"exit\n").unwrap();
    let status = restored.wait(Duration::from_secs(300));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        restored.context()
    );
}
