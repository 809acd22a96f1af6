//! Pause, resume, snapshot and restore through the API socket, end to end: `ember` runs
//! the virtio guest's `snapshot` scenario (a long deterministic computation over guest
//! memory and a virtio-blk disk, see `guests/virtio-guest/src/snapshot.rs`), is paused,
//! snapshotted and killed, and a new `ember` restores it and finishes with the result
//! and exit code of a run that was never interrupted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ember_guests::rust_guest::build_guest;
use ember_guests::testing::{api_request, kvm_available, wait_for_socket, LiveChild};

/// Rounds of the computation: about 10 ms each here, so a few seconds in all, with
/// virtio-blk requests all along.
const ROUNDS: u32 = 400;
/// Guest RAM: small, so that each memory file is quick to write.
const MEMORY: &str = "128M";
const MEMORY_BYTES: u64 = 128 << 20;
const PAGE: u64 = 4096;

fn guest() -> PathBuf {
    build_guest("virtio-guest").unwrap_or_else(|e| panic!("{e}"))
}

fn disk_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

fn cmdline(rounds: u32, idle: bool) -> String {
    format!(
        "ember.test=snapshot ember.rounds={rounds} ember.idle={}",
        u8::from(idle)
    )
}

/// `ember` running the scenario on `disk` (with `disk_options` after its path),
/// serving the API on `socket`.
fn ember_with_api(
    guest: &Path,
    disk: &Path,
    disk_options: &str,
    socket: &Path,
    rounds: u32,
    extra: &[&str],
) -> LiveChild {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command
        .arg("--kernel")
        .arg(guest)
        .args([
            "--cmdline",
            &cmdline(rounds, false),
            "--memory",
            MEMORY,
            "--cpus",
            "2",
        ])
        .arg("--disk")
        .arg(format!("path={}{disk_options}", disk.display()))
        .arg("--api-sock")
        .arg(socket)
        .args(extra);
    let child = LiveChild::spawn(&mut command);
    assert!(
        wait_for_socket(socket, Duration::from_secs(30)),
        "the API socket never appeared\n{}",
        child.context()
    );
    child
}

/// An uninterrupted run: the result line and the exit code.
fn reference(guest: &Path, dir: &Path, rounds: u32) -> (String, i32, Vec<u8>) {
    let disk = disk_image(dir, "reference.img");
    let output = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--kernel")
        .arg(guest)
        .args([
            "--cmdline",
            &cmdline(rounds, false),
            "--memory",
            MEMORY,
            "--cpus",
            "2",
        ])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result = stdout
        .lines()
        .find(|l| l.starts_with("virtio-guest: snapshot result "))
        .unwrap_or_else(|| {
            panic!(
                "no result line\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .to_string();
    let code = output.status.code().expect("an exit code");
    assert!((10..110).contains(&code), "exit code {code}\n{stdout}");
    (result, code, std::fs::read(&disk).unwrap())
}

fn api(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    api_request(socket, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn ok(socket: &Path, method: &str, path: &str, body: Option<&str>) {
    let (status, reply) = api(socket, method, path, body);
    assert_eq!(status, 204, "{method} {path} {body:?}: {reply}");
}

fn pause(socket: &Path) {
    ok(socket, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
}

fn resume(socket: &Path) {
    ok(socket, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
}

fn snapshot(socket: &Path, kind: &str, dir: &Path) {
    let body = format!(
        r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        dir.join("vmstate").display(),
        dir.join("memory").display()
    );
    std::fs::create_dir_all(dir).unwrap();
    ok(socket, "PUT", "/snapshot/create", Some(&body));
}

/// The round the guest printed last, from its lines.
fn last_round(lines: &[String]) -> Option<u32> {
    lines.iter().rev().find_map(|l| {
        l.strip_prefix("virtio-guest: snapshot round ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// Waits for the restored run to end and checks it ends as the reference did.
fn expect_reference_end(mut run: LiveChild, expected: &(String, i32, Vec<u8>), disk: &Path) {
    let status = run.wait(Duration::from_secs(300));
    let lines = run.lines();
    assert!(
        lines.contains(&expected.0),
        "the restored guest's result differs from {:?}\n{}",
        expected.0,
        run.context()
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(expected.1),
        "{}",
        run.context()
    );
    assert!(
        std::fs::read(disk).unwrap() == expected.2,
        "the disk differs from the reference run's"
    );
}

#[test]
fn a_guest_snapshotted_killed_and_restored_finishes_like_an_uninterrupted_one() {
    if !kvm_available("a_guest_snapshotted_killed_and_restored_finishes_like_an_uninterrupted_one")
    {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(&guest, dir.path(), ROUNDS);

    let disk = disk_image(dir.path(), "snap.img");
    let socket = dir.path().join("api.sock");
    let mut first = ember_with_api(&guest, &disk, "", &socket, ROUNDS, &[]);
    first
        .wait_for_line(
            "virtio-guest: snapshot round 100 ",
            0,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|| panic!("the guest did not get to round 100\n{}", first.context()));
    pause(&socket);
    let (status, info) = api(&socket, "GET", "/", None);
    assert_eq!(status, 200, "{info}");
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    // The pause is reported once the output from before it is written; this process's
    // reader thread may take a moment more to read it.
    std::thread::sleep(Duration::from_millis(100));
    let paused_at = last_round(&first.lines()).unwrap();
    // Paused means paused: no round ends while it is.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        last_round(&first.lines()),
        Some(paused_at),
        "{}",
        first.context()
    );
    let snap = dir.path().join("snap");
    snapshot(&socket, "Full", &snap);
    first.kill();
    assert!(
        paused_at < ROUNDS - 1,
        "the guest finished before the pause"
    );

    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command.arg("--restore").arg(&snap);
    let restored = LiveChild::spawn(&mut command);
    // It goes on from where it was paused: the next round is the first it prints.
    let (_, line) = restored
        .wait_for_line("virtio-guest: snapshot round ", 0, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no round after the restore\n{}", restored.context()));
    let first_round: u32 = line
        .trim_start_matches("virtio-guest: snapshot round ")
        .split(' ')
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap();
    // Paused between two lines, the next round's line comes first; paused in the middle
    // of one, its rest (printed by the new process) comes first, then the round after.
    let lines = restored.lines();
    if first_round == paused_at + 2 {
        assert!(
            !lines[0].starts_with("virtio-guest:"),
            "round {} is missing\n{}",
            paused_at + 1,
            restored.context()
        );
    } else {
        assert_eq!(first_round, paused_at + 1, "{}", restored.context());
    }
    expect_reference_end(restored, &expected, &disk);
}

#[test]
fn snapshot_load_through_the_api_and_pause_resume_in_place() {
    if !kvm_available("snapshot_load_through_the_api_and_pause_resume_in_place") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(&guest, dir.path(), ROUNDS);

    let disk = disk_image(dir.path(), "snap.img");
    let socket = dir.path().join("api.sock");
    // A rate-limited disk (generous: the result is the unlimited reference's), so the
    // load restores its limiter's levels into a limiter built from the saved config.
    let mut first = ember_with_api(
        &guest,
        &disk,
        ",ops_size=100000,ops_refill_time=1000",
        &socket,
        ROUNDS,
        &[],
    );
    first
        .wait_for_line(
            "virtio-guest: snapshot round 20 ",
            0,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|| panic!("no round 20\n{}", first.context()));
    // Pausing and resuming in place, many times, changes nothing the guest computes.
    for _ in 0..10 {
        pause(&socket);
        resume(&socket);
        std::thread::sleep(Duration::from_millis(20));
    }
    first
        .wait_for_line(
            "virtio-guest: snapshot round 60 ",
            0,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|| panic!("no round 60\n{}", first.context()));
    pause(&socket);
    let snap = dir.path().join("snap");
    snapshot(&socket, "Full", &snap);
    first.kill();

    // A new ember, configured through the API only: PUT /snapshot/load.
    let socket2 = dir.path().join("api2.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command.arg("--api-sock").arg(&socket2);
    let restored = LiveChild::spawn(&mut command);
    assert!(
        wait_for_socket(&socket2, Duration::from_secs(30)),
        "{}",
        restored.context()
    );
    let (status, info) = api(&socket2, "GET", "/", None);
    assert_eq!(status, 200, "{info}");
    assert!(info.contains(r#""state":"Not started""#), "{info}");
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": false}}"#,
        snap.join("vmstate").display(),
        snap.join("memory").display()
    );
    ok(&socket2, "PUT", "/snapshot/load", Some(&body));
    let (status, info) = api(&socket2, "GET", "/", None);
    assert_eq!(status, 200, "{info}");
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    let (status, config) = api(&socket2, "GET", "/vm/config", None);
    assert_eq!(status, 200, "{config}");
    assert!(config.contains(r#""vcpu_count":2"#), "{config}");
    assert!(config.contains(r#""mem_size_mib":128"#), "{config}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        last_round(&restored.lines()).is_none(),
        "a VM loaded with resume_vm false ran\n{}",
        restored.context()
    );
    resume(&socket2);
    let restored_lines = restored.wait_for_line(
        "virtio-guest: snapshot result ",
        0,
        Duration::from_secs(300),
    );
    assert!(restored_lines.is_some(), "{}", restored.context());
    expect_reference_end(restored, &expected, &disk);
}

/// Pages whose contents differ between two memory files of the same size.
fn changed_pages(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// The pages of `file` that hold data (SEEK_DATA/SEEK_HOLE), as page numbers.
fn data_pages(file: &Path) -> Vec<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut pages = Vec::new();
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on a descriptor this function owns.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole };
        pages.extend((data as u64 / PAGE)..(end as u64).div_ceil(PAGE));
        at = end;
    }
    pages
}

#[test]
fn a_diff_snapshot_holds_only_the_pages_that_changed() {
    if !kvm_available("a_diff_snapshot_holds_only_the_pages_that_changed") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let expected = reference(&guest, dir.path(), ROUNDS);
    let disk = disk_image(dir.path(), "snap.img");
    let socket = dir.path().join("api.sock");
    let mut run = ember_with_api(&guest, &disk, "", &socket, ROUNDS, &["--track-dirty-pages"]);
    run.wait_for_line(
        "virtio-guest: snapshot round 30 ",
        0,
        Duration::from_secs(120),
    )
    .unwrap_or_else(|| panic!("no round 30\n{}", run.context()));

    // Base (full), then a diff over a few rounds, then a full one for comparison.
    pause(&socket);
    let base = dir.path().join("base");
    snapshot(&socket, "Full", &base);
    resume(&socket);
    let (_, _) = run
        .wait_for_line(
            &format!(
                "virtio-guest: snapshot round {} ",
                last_round(&run.lines()).unwrap() + 3
            ),
            0,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|| panic!("no rounds after the resume\n{}", run.context()));
    pause(&socket);
    let diff = dir.path().join("diff");
    snapshot(&socket, "Diff", &diff);
    let after = dir.path().join("after");
    snapshot(&socket, "Full", &after);
    // Nothing ran between the diff and this one: an empty diff.
    let empty = dir.path().join("empty");
    snapshot(&socket, "Diff", &empty);
    assert_eq!(data_pages(&empty.join("memory")), Vec::<u64>::new());

    let base_mem = std::fs::read(base.join("memory")).unwrap();
    let after_mem = std::fs::read(after.join("memory")).unwrap();
    assert_eq!(base_mem.len() as u64, MEMORY_BYTES);
    let changed = changed_pages(&base_mem, &after_mem);
    let written = data_pages(&diff.join("memory"));
    assert!(!changed.is_empty());
    // Every page that changed is in the diff...
    let missing: Vec<_> = changed.iter().filter(|p| !written.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "changed pages missing from the diff: {missing:?}"
    );
    // ... and little else: pages written with the same bytes (the guest's stack, ring
    // entries rewritten) are dirty without changing. The guest's buffer is 256 pages.
    assert!(
        written.len() <= changed.len() + 64,
        "the diff has {} pages, {} changed",
        written.len(),
        changed.len()
    );
    assert!(written.len() < 512, "the diff has {} pages", written.len());
    // Diff state file says so, and a raw diff memory file is refused.
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command.arg("--restore").arg(&diff);
    let mut refused = LiveChild::spawn(&mut command);
    let status = refused.wait(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "{}",
        refused.context()
    );
    assert!(
        refused.stderr().contains("merge it onto"),
        "{}",
        refused.context()
    );

    // Merged onto the base, the diff restores, and the guest finishes as the reference.
    run.kill();
    let status = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--merge-diff")
        .arg(diff.join("memory"))
        .arg("--into")
        .arg(base.join("memory"))
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(base.join("memory")).unwrap() == after_mem);
    std::fs::rename(diff.join("vmstate"), base.join("vmstate")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command.arg("--restore").arg(&base);
    expect_reference_end(LiveChild::spawn(&mut command), &expected, &disk);
}

/// `ember --restore DIR` on `state` (and a good memory file): one error line, exit 1.
fn restore_fails(dir: &Path, state: &[u8], expect: &str) {
    std::fs::write(dir.join("vmstate"), state).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("--restore")
        .arg(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("ember: error: "), "{stderr}");
    assert!(stderr.contains(expect), "expected {expect:?} in {stderr}");
    assert!(output.stdout.is_empty(), "the guest ran");
}

#[test]
fn corrupt_truncated_or_other_version_snapshots_are_refused_with_one_line() {
    if !kvm_available("corrupt_truncated_or_other_version_snapshots_are_refused_with_one_line") {
        return;
    }
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_image(dir.path(), "snap.img");
    let socket = dir.path().join("api.sock");
    let mut run = ember_with_api(&guest, &disk, "", &socket, ROUNDS, &[]);
    run.wait_for_line(
        "virtio-guest: snapshot round 5 ",
        0,
        Duration::from_secs(120),
    )
    .unwrap_or_else(|| panic!("no round 5\n{}", run.context()));
    pause(&socket);
    let snap = dir.path().join("snap");
    snapshot(&socket, "Full", &snap);
    run.kill();
    let good = std::fs::read(snap.join("vmstate")).unwrap();

    restore_fails(&snap, &good[..good.len() / 2], "truncated");
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    restore_fails(&snap, &flipped, "checksum");
    let mut version = good.clone();
    version[8] = version[8].wrapping_add(1);
    restore_fails(&snap, &version, "version");
    restore_fails(&snap, b"not a snapshot at all, just some text", "magic");
    restore_fails(&snap, b"", "truncated");
    // A memory file shorter than guest RAM.
    std::fs::write(snap.join("vmstate"), &good).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    memory.set_len(MEMORY_BYTES / 2).unwrap();
    restore_fails(&snap, &good, "bytes, but the snapshot's guest RAM is");
}

#[test]
fn api_errors_name_what_was_wrong() {
    if !kvm_available("api_errors_name_what_was_wrong") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_ember"));
    command.arg("--api-sock").arg(&socket);
    let mut ember = LiveChild::spawn(&mut command);
    assert!(
        wait_for_socket(&socket, Duration::from_secs(30)),
        "{}",
        ember.context()
    );
    let fault = |method: &str, path: &str, body: Option<&str>, status: u16, needle: &str| {
        let (got, reply) = api(&socket, method, path, body);
        assert_eq!(got, status, "{method} {path} {body:?}: {reply}");
        assert!(reply.contains("fault_message"), "{reply}");
        assert!(
            reply.contains(needle),
            "{method} {path}: {reply} lacks {needle:?}"
        );
    };
    // Before InstanceStart.
    fault("PUT", "/machine-config", Some("{"), 400, "");
    fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}"#),
        400,
        "bogus",
    );
    fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": true}"#),
        400,
        "smt",
    );
    fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
        400,
        "vcpu_count",
    );
    fault("PUT", "/balloon", Some("{}"), 400, "balloon");
    fault("PUT", "/nonsense", Some("{}"), 400, "/nonsense");
    fault("DELETE", "/vm", None, 400, "DELETE");
    fault(
        "PUT",
        "/drives/rootfs",
        Some(r#"{"drive_id": "other", "path_on_host": "/x", "is_root_device": false}"#),
        400,
        "drive_id",
    );
    fault(
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        400,
        "not started",
    );
    fault(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/x", "mem_file_path": "/tmp/y"}"#),
        400,
        "not started",
    );
    fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        "boot",
    );
    fault(
        "PUT",
        "/snapshot/load",
        Some(
            r#"{"snapshot_path": "/nonexistent/vmstate", "mem_backend": {"backend_type": "File", "backend_path": "/nonexistent/memory"}}"#,
        ),
        400,
        "/nonexistent/vmstate",
    );
    fault(
        "PUT",
        "/snapshot/load",
        Some(
            r#"{"snapshot_path": "/x", "mem_backend": {"backend_type": "Uffd", "backend_path": "/y"}}"#,
        ),
        400,
        "Uffd",
    );

    // Configure and start the VM through the API only.
    let guest = guest();
    let disk = disk_image(dir.path(), "api.img");
    ok(
        &socket,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#),
    );
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
        guest.display(),
        cmdline(100_000, false)
    );
    ok(&socket, "PUT", "/boot-source", Some(&boot));
    let drive = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
        disk.display()
    );
    ok(&socket, "PUT", "/drives/rootfs", Some(&drive));
    ok(
        &socket,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    ember
        .wait_for_line(
            "virtio-guest: snapshot round 2 ",
            0,
            Duration::from_secs(120),
        )
        .unwrap_or_else(|| panic!("the API-started guest did not run\n{}", ember.context()));

    // Ctrl+Alt+Del goes to the i8042 (4 bytes a time); this guest never reads its
    // keyboard, so the 16-byte buffer takes four and refuses the fifth, by name.
    for _ in 0..4 {
        ok(
            &socket,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        );
    }
    fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        400,
        "keyboard buffer full",
    );

    // While it runs.
    fault(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{0}/s", "mem_file_path": "{0}/m"}}"#,
            dir.path().display()
        )),
        400,
        "paused",
    );
    fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
        400,
        "InstanceStart",
    );
    fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        "already",
    );
    pause(&socket);
    fault(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_type": "Diff", "snapshot_path": "{0}/s", "mem_file_path": "{0}/m"}}"#,
            dir.path().display()
        )),
        400,
        "track_dirty_pages",
    );
    fault(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/nonexistent/dir/s", "mem_file_path": "/nonexistent/dir/m"}"#),
        400,
        "/nonexistent/dir/m",
    );
    fault(
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{0}/s", "mem_backend": {{"backend_type": "File", "backend_path": "{0}/m"}}}}"#,
            dir.path().display()
        )),
        400,
        "new ember",
    );
    let (status, config) = api(&socket, "GET", "/vm/config", None);
    assert_eq!(status, 200, "{config}");
    assert!(
        config.contains("rootfs") || config.contains(&disk.display().to_string()),
        "{config}"
    );
    // Still alive and well after all that.
    resume(&socket);
    let (status, info) = api(&socket, "GET", "/", None);
    assert_eq!((status, info.contains("Running")), (200, true), "{info}");
    ember.kill();
}
