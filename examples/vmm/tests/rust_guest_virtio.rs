//! `ember`'s virtio-mmio devices (`--disk`, `--net`, `--rng`) driven from inside a guest by
//! the crates.io `virtio-drivers` crate: the Rust test guest (`guests/virtio-guest`) runs
//! the scenario its command line names (`ember.test=...`) and reports on the serial port.
//!
//! Every run has a timeout; stdout lines are timestamped as they arrive, which is how the
//! benchmark measures guest-visible throughput (the guest has no clock).
//!
//! The network test needs root, `/dev/net/tun` and `ip` (iproute2); without them it says
//! so loudly and passes, unless `EMBER_REQUIRE_TAP=1`. Its tap lives in a private network
//! namespace, deleted afterwards, so no traffic leaves it.
//!
//! The benchmark moves 8 MiB by default; `EMBER_BENCH_MIB=64` makes it move more:
//! `EMBER_BENCH_MIB=64 cargo test -p ember-vmm --test rust_guest_virtio virtio_blk_bench -- --nocapture`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ember_guests::rust_guest::build_guest;
use ember_guests::testing::{
    kvm_available, run_with_timeout, tap_unavailable, CapturedRun, TapNamespace,
};

const SECTOR: usize = 512;
/// What the `blk` tests put at the start of the disk.
const DISK_GREETING: &[u8] = b"Hello from the disk";

/// Runs `command` with stdout and stderr captured (stdout lines stamped with their
/// arrival time), killing it after `timeout`.
fn run(mut command: Command, timeout: Duration) -> CapturedRun {
    run_with_timeout(&mut command, timeout)
}

fn guest() -> PathBuf {
    build_guest("virtio-guest").unwrap_or_else(|e| panic!("{e}"))
}

/// `ember --kernel <guest> <args> --cmdline "console=ttyS0 <cmdline>"`, optionally run
/// through `prefix` (e.g. `ip netns exec NS`).
fn ember(prefix: &[&str], args: &[&str], cmdline: &str) -> Command {
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
        .arg(guest())
        .args(args)
        .args(["--cmdline", &format!("console=ttyS0 {cmdline}")]);
    command
}

/// A 1 MiB disk image starting with [`DISK_GREETING`].
fn greeting_disk(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..DISK_GREETING.len()].copy_from_slice(DISK_GREETING);
    std::fs::write(&path, &image).unwrap();
    path
}

fn disk_arg(path: &Path, readonly: bool) -> String {
    format!(
        "path={}{}",
        path.display(),
        if readonly { ",readonly=on" } else { "" }
    )
}

/// The pattern the guest's `blk` scenario writes to sector 1.
fn sector1_pattern() -> Vec<u8> {
    (0..SECTOR).map(|i| (i as u8) ^ 0x5a).collect()
}

#[test]
fn virtio_blk_reads_writes_and_flushes() {
    if !kvm_available("virtio_blk_reads_writes_and_flushes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = greeting_disk(&dir);
    let before = std::fs::read(&disk).unwrap();
    let r = run(
        ember(&[], &["--disk", &disk_arg(&disk, false)], "ember.test=blk"),
        Duration::from_secs(60),
    );
    r.assert_success();
    r.line("virtio-guest: blk capacity 2048 sectors, read-only false");
    // GET_ID: `ember-` and a hash of the image's path, not its inode number.
    let id = r.after("virtio-guest: blk id ");
    let ino = std::fs::metadata(&disk).unwrap().ino();
    assert!(id.starts_with("ember-") && id.len() == 20, "{id:?}");
    assert!(
        !id.contains(&ino.to_string()),
        "GET_ID {id} shows the inode {ino}"
    );
    r.line("virtio-guest: blk sector 0: Hello from the d");
    r.line("virtio-guest: blk wrote and flushed sector 1");
    r.line("virtio-guest: blk sector 1 read back matches");
    r.line("virtio-guest: blk ok capacity=2048");

    // The write reached the file: sector 1 holds the pattern, nothing else changed.
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), before.len());
    assert_eq!(&after[SECTOR..2 * SECTOR], &sector1_pattern()[..]);
    assert_eq!(&after[..SECTOR], &before[..SECTOR], "sector 0 changed");
    assert!(
        after[2 * SECTOR..].iter().all(|&b| b == 0),
        "bytes after sector 1 changed"
    );
}

#[test]
fn virtio_blk_readonly_refuses_writes() {
    if !kvm_available("virtio_blk_readonly_refuses_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = greeting_disk(&dir);
    let before = std::fs::read(&disk).unwrap();
    let r = run(
        ember(
            &[],
            &["--disk", &disk_arg(&disk, true)],
            "ember.test=blk-ro",
        ),
        Duration::from_secs(60),
    );
    r.assert_success();
    r.line("virtio-guest: blk-ro capacity 2048 sectors, read-only true");
    r.line("virtio-guest: blk-ro sector 0: Hello from the d");
    r.line("virtio-guest: blk-ro write refused");
    r.line("virtio-guest: blk-ro sector 1 unchanged");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "the read-only image changed"
    );
}

#[test]
fn virtio_blk_scenario_fails_without_a_disk() {
    if !kvm_available("virtio_blk_scenario_fails_without_a_disk") {
        return;
    }
    // The guest's failure path: a clear line and a non-zero exit, not a hang.
    let r = run(
        ember(&[], &["--rng"], "ember.test=blk"),
        Duration::from_secs(60),
    );
    assert_eq!(r.status.and_then(|s| s.code()), Some(1), "{}", r.context());
    r.line("virtio-guest: blk FAIL: no virtio-blk device on the command line");
}

#[test]
fn virtio_rng_returns_random_bytes() {
    if !kvm_available("virtio_rng_returns_random_bytes") {
        return;
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = run(
            ember(&[], &["--rng"], "ember.test=rng"),
            Duration::from_secs(60),
        );
        r.assert_success();
        let first = r.after("virtio-guest: rng first request: 64 bytes: ");
        let second = r.after("virtio-guest: rng second request: 64 bytes: ");
        for hex in [&first, &second] {
            assert_eq!(hex.len(), 128, "{}", r.context());
            assert!(
                hex.chars().all(|c| c.is_ascii_hexdigit()),
                "{}",
                r.context()
            );
            assert_ne!(hex.as_str(), "0".repeat(128), "{}", r.context());
        }
        assert_ne!(first, second, "{}", r.context());
        r.line(&format!("virtio-guest: rng ok {}", &first[..16]));
        seen.push(first);
    }
    assert_ne!(seen[0], seen[1], "two VMs got the same random bytes");
}

#[test]
fn virtio_net_gets_an_arp_reply_through_a_tap() {
    const TEST: &str = "virtio_net_gets_an_arp_reply_through_a_tap";
    const GUEST_MAC: &str = "52:54:00:12:34:56";
    if !kvm_available(TEST) {
        return;
    }
    let ns = match TapNamespace::with_address("virtio", "etap0", "10.0.2.1/24") {
        Ok(ns) => ns,
        Err(why) => return tap_unavailable(TEST, why),
    };
    let link = ns.ip(&["link", "show", "etap0"]).unwrap();
    let tap_mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in `ip link show`: {link}"))
        .to_string();
    let (rx_before, _) = ns.packets().unwrap();

    let r = run(
        ember(
            &["ip", "netns", "exec", ns.name()],
            &["--net", &format!("tap=etap0,mac={GUEST_MAC}")],
            "ember.test=net",
        ),
        Duration::from_secs(60),
    );
    r.assert_success();
    // The MAC from the configuration space is the one given on the command line.
    r.line(&format!("virtio-guest: net mac {GUEST_MAC}"));
    // The host kernel answered: the reply came from the tap's own MAC.
    r.line(&format!(
        "virtio-guest: net ok arp reply from 10.0.2.1 is at {tap_mac}"
    ));
    let header = r.after("virtio-guest: net rx header ");
    assert!(
        header.starts_with("flags 0x0 gso 0x0 num_buffers 1,"),
        "{}",
        r.context()
    );
    // The guest's frames reached the host side of the tap.
    let (rx_after, _) = ns.packets().unwrap();
    assert!(
        rx_after > rx_before,
        "etap0 received nothing from the guest ({rx_before} -> {rx_after})\n{}",
        r.context()
    );
}

/// Rounds to one decimal.
fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    (bytes as f64 / (1u64 << 20) as f64 / d.as_secs_f64() * 10.0).round() / 10.0
}

/// Guest-visible virtio-blk throughput: `EMBER_BENCH_MIB` (default 8) MiB read, then
/// written, sequentially in 64 KiB requests, one in flight. No timing assertions: it
/// checks the data both ways and prints the rates to stderr.
#[test]
fn virtio_blk_bench() {
    if !kvm_available("virtio_blk_bench") {
        return;
    }
    let mib: u64 = std::env::var("EMBER_BENCH_MIB")
        .ok()
        .map(|v| v.parse().expect("EMBER_BENCH_MIB must be a number"))
        .unwrap_or(8);
    let bytes = mib << 20;
    let sectors = bytes / SECTOR as u64;
    // Every sector starts with its number; the guest checks them (ember.verify=1).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.img");
    let mut image = vec![0u8; bytes as usize];
    for (n, sector) in image.chunks_exact_mut(SECTOR).enumerate() {
        sector[..8].copy_from_slice(&(n as u64).to_le_bytes());
    }
    std::fs::write(&path, &image).unwrap();
    drop(image);
    let guest = guest(); // built before the clock starts

    let r = run(
        ember(
            &[],
            &["--disk", &disk_arg(&path, false)],
            &format!("ember.test=blk-bench ember.mib={mib} ember.verify=1"),
        ),
        Duration::from_secs(120 + 10 * mib),
    );
    r.assert_success();
    let start = r.line("virtio-guest: bench start");
    let read = r.line(&format!("virtio-guest: bench read done {bytes}"));
    r.line(&format!(
        "virtio-guest: bench read verified {sectors} sectors"
    ));
    let written = r.line(&format!("virtio-guest: bench write done {bytes}"));
    let flushed = r.line("virtio-guest: bench flush done");

    // The writes reached the file: every sector now starts with its number's complement.
    let image = std::fs::read(&path).unwrap();
    assert_eq!(image.len() as u64, bytes);
    for (n, sector) in image.chunks_exact(SECTOR).enumerate() {
        let tag = u64::from_le_bytes(sector[..8].try_into().unwrap());
        assert_eq!(tag, !(n as u64), "sector {n} after the bench");
    }

    let read_time = read - start;
    let write_time = written - read;
    eprintln!(
        "virtio-blk bench ({} guest {}): {mib} MiB in 64 KiB requests, 1 in flight: \
         read {} MiB/s ({read_time:.2?}), write {} MiB/s ({write_time:.2?}), \
         flush {:.2?}; boot to bench start {:.2?}",
        env!("CARGO_BIN_EXE_ember"),
        guest.display(),
        mib_per_s(bytes, read_time),
        mib_per_s(bytes, write_time),
        flushed - written,
        start - r.started,
    );
}
