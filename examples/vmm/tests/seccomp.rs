//! `ember`'s per-thread seccomp filters, end to end: a forbidden system call from each
//! kind of thread (main, vCPU, worker spawner, virtio worker, console writer, log
//! writer) ends `ember` with one
//! clear line on stderr and exit status 148, and with `--seccomp off` the same call is
//! harmless and the guest finishes.
//!
//! The forbidden call comes from `EMBER_SECCOMP_SELFTEST=<kind>`, which makes the
//! threads of that kind issue a call their filter forbids right after installing it
//! (`socket`; for a virtio worker `clone3`, which the spawner filter the worker
//! inherits allows, so only the worker's own filter stops it). The guest is the Rust
//! test guest (`guests/virtio-guest`), which starts its virtio device at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ember_guests::rust_guest::build_guest;
use ember_guests::testing::{
    kvm_available, run_with_timeout, tap_unavailable, CapturedRun, TapNamespace,
};

/// Firecracker's exit status after a forbidden system call, which `ember` uses too.
const BAD_SYSCALL_STATUS: i32 = 148;

/// Runs `command` with stdout and stderr captured, killing it after 60 s.
fn run(mut command: Command) -> CapturedRun {
    run_with_timeout(&mut command, Duration::from_secs(60))
}

fn guest() -> PathBuf {
    build_guest("virtio-guest").unwrap_or_else(|e| panic!("{e}"))
}

/// The guest's scenario and the device arguments it needs.
#[derive(Clone, Copy)]
enum Scenario<'a> {
    Rng,
    Blk,
    /// virtio-net on the tap [`TAP`] of this namespace: the guest sends ten frames.
    Net(&'a TapNamespace),
}

/// `ember` running the test guest's `scenario`, with `EMBER_SECCOMP_SELFTEST=selftest`
/// and `extra` arguments. `disk` is the image for [`Scenario::Blk`].
fn ember(scenario: Scenario, disk: &Path, selftest: Option<&str>, extra: &[&str]) -> Command {
    let mut command = match scenario {
        // `ip netns exec` execs ember in the namespace that holds the tap.
        Scenario::Net(ns) => ns.exec(env!("CARGO_BIN_EXE_ember")),
        _ => Command::new(env!("CARGO_BIN_EXE_ember")),
    };
    command.arg("--kernel").arg(guest());
    let test = match scenario {
        Scenario::Rng => {
            command.arg("--rng");
            "rng"
        }
        Scenario::Blk => {
            command
                .arg("--disk")
                .arg(format!("path={}", disk.display()));
            "blk"
        }
        Scenario::Net(_) => {
            command.args(["--net", &format!("tap={TAP}")]);
            "net-tx-saturate ember.bytes=15260 ember.req=1526"
        }
    };
    command
        .args(extra)
        .args(["--cmdline", &format!("console=ttyS0 ember.test={test}")]);
    command.env_remove("EMBER_SECCOMP_SELFTEST");
    if let Some(kind) = selftest {
        command.env("EMBER_SECCOMP_SELFTEST", kind);
    }
    command
}

/// The tap [`Scenario::Net`] uses.
const TAP: &str = "sctap0";

/// A 1 MiB disk image for the `blk` scenario.
fn disk(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    path
}

/// The self-test of thread kind `kind` on `thread`, which makes system call `nr`
/// (`name`): with the filters on (the default, no `--seccomp` argument) `ember` ends
/// with status 148 and the report line; with `--seccomp off` the guest passes.
fn forbidden_call_ends_ember(
    test: &str,
    scenario: Scenario,
    kind: &str,
    thread: &str,
    nr: u32,
    name: &str,
    extra: &[&str],
) {
    if !kvm_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&dir);
    let announced = format!("seccomp self-test (EMBER_SECCOMP_SELFTEST={kind}): thread '{thread}' makes system call {nr} ({name})");
    let report = format!(
        "ember: seccomp: thread '{thread}' made a forbidden system call {nr} ({name}); \
         exiting. (--seccomp off disables the filters, for debugging)"
    );

    let on = run(ember(scenario, &disk, Some(kind), extra));
    assert_eq!(on.code(), Some(BAD_SYSCALL_STATUS), "{}", on.context());
    assert!(on.stderr.contains(&announced), "{}", on.context());
    assert!(
        on.stderr.lines().any(|l| l == report),
        "no line {report:?}\n{}",
        on.context()
    );
    assert!(!on.stderr.contains("survived"), "{}", on.context());

    let off = run(ember(
        scenario,
        &disk,
        Some(kind),
        &[extra, &["--seccomp", "off"]].concat(),
    ));
    assert_eq!(off.code(), Some(0), "{}", off.context());
    assert!(off.stderr.contains(&announced), "{}", off.context());
    assert!(
        off.stderr.contains(&format!(
            "seccomp self-test: thread '{thread}' survived system call {nr}"
        )),
        "{}",
        off.context()
    );
    assert!(
        off.stderr
            .contains("seccomp filters are off (--seccomp off)"),
        "{}",
        off.context()
    );
    assert!(!off.stderr.contains("ember: seccomp:"), "{}", off.context());
    let passed = match scenario {
        Scenario::Rng => "virtio-guest: rng passed",
        Scenario::Blk => "virtio-guest: blk passed",
        Scenario::Net(_) => "virtio-guest: saturate done 15260 bytes 10 requests",
    };
    assert!(off.stdout.contains(passed), "{}", off.context());
}

#[test]
fn a_forbidden_call_on_the_main_thread_ends_ember() {
    forbidden_call_ends_ember(
        "a_forbidden_call_on_the_main_thread_ends_ember",
        Scenario::Rng,
        "main",
        "main",
        41,
        "socket",
        &[],
    );
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_ember() {
    forbidden_call_ends_ember(
        "a_forbidden_call_on_a_vcpu_thread_ends_ember",
        Scenario::Rng,
        "vcpu",
        "ember-vcpu-0",
        41,
        "socket",
        &[],
    );
}

#[test]
fn a_forbidden_call_on_the_virtio_rng_worker_ends_ember() {
    forbidden_call_ends_ember(
        "a_forbidden_call_on_the_virtio_rng_worker_ends_ember",
        Scenario::Rng,
        "virtio-rng",
        "ember-virtio-rng",
        435,
        "clone3",
        &[],
    );
}

#[test]
fn a_forbidden_call_on_the_virtio_blk_worker_ends_ember() {
    forbidden_call_ends_ember(
        "a_forbidden_call_on_the_virtio_blk_worker_ends_ember",
        Scenario::Blk,
        "virtio-blk",
        "ember-virtio-blk",
        435,
        "clone3",
        &[],
    );
}

/// Needs root, `/dev/net/tun` and iproute2 for its tap; without them it says so loudly
/// and passes, unless `EMBER_REQUIRE_TAP=1` (as in CI).
#[test]
fn a_forbidden_call_on_the_virtio_net_worker_ends_ember() {
    const TEST: &str = "a_forbidden_call_on_the_virtio_net_worker_ends_ember";
    let netns = match TapNamespace::create("seccomp", TAP) {
        Ok(ns) => ns,
        Err(why) => return tap_unavailable(TEST, why),
    };
    forbidden_call_ends_ember(
        TEST,
        Scenario::Net(&netns),
        "virtio-net",
        "ember-virtio-net",
        435,
        "clone3",
        &[],
    );
}

#[test]
fn a_forbidden_call_on_the_spawner_thread_ends_ember() {
    forbidden_call_ends_ember(
        "a_forbidden_call_on_the_spawner_thread_ends_ember",
        Scenario::Rng,
        "spawner",
        "ember-spawner",
        41,
        "socket",
        &[],
    );
}

#[test]
fn a_forbidden_call_on_the_console_writer_ends_ember() {
    forbidden_call_ends_ember(
        "a_forbidden_call_on_the_console_writer_ends_ember",
        Scenario::Rng,
        "console",
        "serial-output",
        41,
        "socket",
        &[],
    );
}

#[test]
fn a_forbidden_call_on_the_log_writer_ends_ember() {
    forbidden_call_ends_ember(
        "a_forbidden_call_on_the_log_writer_ends_ember",
        Scenario::Rng,
        "logger",
        "ember-log",
        41,
        "socket",
        &[],
    );
}

#[test]
fn a_forbidden_call_on_the_api_thread_ends_ember() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    forbidden_call_ends_ember(
        "a_forbidden_call_on_the_api_thread_ends_ember",
        Scenario::Rng,
        "api",
        "ember-api",
        41,
        "socket",
        &["--api-sock", socket.to_str().unwrap()],
    );
}

/// The main thread of an `ember` serving the API runs under a filter of its own (the
/// main filter plus what pausing and snapshots take); it is still a filter.
#[test]
fn a_forbidden_call_on_the_main_thread_of_an_api_ember_ends_ember() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    forbidden_call_ends_ember(
        "a_forbidden_call_on_the_main_thread_of_an_api_ember_ends_ember",
        Scenario::Rng,
        "main-api",
        "main",
        41,
        "socket",
        &["--api-sock", socket.to_str().unwrap()],
    );
}

/// With the filters on and no self-test, the guest's devices work (every other
/// end-to-end test runs with them on too).
#[test]
fn the_guest_runs_under_the_filters() {
    if !kvm_available("the_guest_runs_under_the_filters") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&dir);
    for (scenario, passed) in [
        (Scenario::Rng, "virtio-guest: rng passed"),
        (Scenario::Blk, "virtio-guest: blk passed"),
    ] {
        let r = run(ember(scenario, &disk, None, &["--seccomp", "on"]));
        assert_eq!(r.code(), Some(0), "{}", r.context());
        assert!(r.stdout.contains(passed), "{}", r.context());
        assert!(!r.stderr.contains("seccomp"), "{}", r.context());
    }
}

#[test]
fn bad_seccomp_settings_are_rejected_by_name() {
    let r = run({
        let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
        c.args(["--seccomp", "maybe"]);
        c
    });
    assert_eq!(r.code(), Some(2), "{}", r.context());
    assert!(r.stderr.contains("'maybe'"), "{}", r.context());
    assert!(r.stderr.contains("expected on or off"), "{}", r.context());

    let r = run({
        let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
        c.env("EMBER_SECCOMP_SELFTEST", "gpu");
        c
    });
    assert_eq!(r.code(), Some(1), "{}", r.context());
    assert!(
        r.stderr
            .contains("EMBER_SECCOMP_SELFTEST=gpu: not a thread kind (expected one of: main, vcpu, spawner, virtio-blk, virtio-net, virtio-rng, console, logger, api, main-api)"),
        "{}",
        r.context()
    );
}
