//! The virtio-rng and virtio-net (tx and rx) rate limiters measured from inside a guest
//! that saturates the device: the Rust test guest's `rng-saturate` and `net-tx-saturate`
//! scenarios move `ember.bytes` bytes as fast as the device allows, and
//! `net-rx-saturate` takes frames as fast as they come while the host floods the tap;
//! each prints a line before and after, which the host timestamps (the guest has no
//! clock).
//!
//! Each limited transfer must take at least `(total - size - one_time_burst) / rate`
//! (less one frame for rx, which the limiter lets through while not blocked and charges
//! afterwards; times 0.95 for clock and line-delivery slack): a lower bound, which
//! slowness cannot break, and which fails if the limiter is removed. The same transfer
//! without a limit must beat the configured rate by far, so the bound means something.
//! Run with `--nocapture` to see the measured rates against the configured ones:
//!
//! `cargo test -p ember-vmm --test rate_limit -- --nocapture --test-threads 1`
//!
//! The net tests need root, `/dev/net/tun` and `ip` (iproute2), and say so loudly and
//! pass without them, unless `EMBER_REQUIRE_TAP=1`; their tap lives in a private network
//! namespace, deleted afterwards.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ember_guests::rust_guest::build_guest;
use ember_guests::testing::{
    kvm_available, run_with_timeout, tap_unavailable, CapturedRun, TapError, TapNamespace,
};

/// Slack on the lower bound: the guest's lines reach us through the serial port and a
/// pipe, a little after the transfer starts and ends.
const SLACK: f64 = 0.95;

/// Runs `command` (stdout lines stamped with their arrival time), killing it after
/// `timeout`.
fn run(mut command: Command, timeout: Duration) -> CapturedRun {
    run_with_timeout(&mut command, timeout)
}

/// The time between the guest's `saturate start` and `saturate done` lines.
fn transfer_time(run: &CapturedRun) -> Duration {
    run.line_starting("virtio-guest: saturate done")
        .duration_since(run.line_starting("virtio-guest: saturate start"))
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

    /// Tokens of `total` that must come at the refill rate: all but the bucket, the
    /// burst and `overdraft` (what one request may take beyond an empty bucket).
    fn steady(&self, total: u64, overdraft: u64) -> u64 {
        total.saturating_sub(self.size + self.burst + overdraft)
    }

    /// The least time `total` tokens can take: the steady part at the refill rate.
    fn min_time(&self, total: u64, overdraft: u64) -> Duration {
        Duration::from_secs_f64(self.steady(total, overdraft) as f64 / self.rate())
    }
}

/// A limited and an unlimited run of the same saturating transfer.
struct Measure<'a> {
    what: &'a str,
    unit: &'a str,
    /// Tokens the transfer takes from the bucket (bytes, or requests).
    total: u64,
    /// Tokens the last request may take beyond an empty bucket: 0 where the limiter
    /// checks a request's cost before letting it through, one frame where it charges
    /// after the fact (rx: the frame's size is known only once read).
    overdraft: u64,
    bucket: Bucket,
    limited: &'a CapturedRun,
    unlimited: &'a CapturedRun,
}

impl Measure<'_> {
    /// Checks the lower bound and that the unlimited transfer is much faster, and prints
    /// the measured rates against the configured one.
    fn check(&self) {
        self.limited.assert_success();
        self.unlimited.assert_success();
        let limited = transfer_time(self.limited);
        let unlimited = transfer_time(self.unlimited);
        let min = self
            .bucket
            .min_time(self.total, self.overdraft)
            .mul_f64(SLACK);
        let rate = self.bucket.rate();
        // The steady part of the transfer: what the bucket and burst did not cover.
        let steady = self.bucket.steady(self.total, self.overdraft) as f64;
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
        overdraft: 0,
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
        overdraft: 0,
        bucket,
        limited: &limited,
        unlimited: &unlimited,
    }
    .check();
}

/// The tap the net tests use, in a [`TapNamespace`] of their own.
const TAP: &str = "rltap0";

/// A namespace with [`TAP`] in it, or why there is none.
fn tap_namespace() -> Result<TapNamespace, TapError> {
    TapNamespace::create("rl", TAP)
}

#[test]
fn net_tx_limits_hold_a_saturating_guest() {
    const TEST: &str = "net_tx_limits_hold_a_saturating_guest";
    if !kvm_available(TEST) {
        return;
    }
    let ns = match tap_namespace() {
        Ok(ns) => ns,
        Err(why) => return tap_unavailable(TEST, why),
    };
    let guest = guest();
    let netns = ["ip", "netns", "exec", ns.name()];
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
        overdraft: 0,
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
        overdraft: 0,
        bucket,
        limited: &limited,
        unlimited: &unlimited,
    }
    .check();
}

/// Frames the flood sends every millisecond: about 30 000 a second, far above the rx
/// limits below and above what the guest takes unlimited; the tap drops what ember has
/// not read (its queue holds 500 frames).
const FLOOD_BURST: usize = 32;

/// Broadcast frames sent to `rltap0` on its host side, from a thread inside the
/// namespace, until dropped: the kernel hands them to ember's tap reads.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, String>>>,
}

impl Flood {
    /// Starts sending frames of `len` bytes (Ethernet header included, no FCS) into
    /// `ns`'s `rltap0`.
    fn start(ns: &TapNamespace, len: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let path = format!("/run/netns/{}", ns.name());
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || flood(&path, len, &flag));
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the flood: the frames sent, or why it failed.
    fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the flood thread panicked".into()),
            None => Err("the flood was already stopped".into()),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The body of [`Flood`]'s thread: enters the namespace at `netns` (only this thread
/// moves), opens a packet socket on `rltap0` and sends bursts of frames until `stop`.
fn flood(netns: &str, len: usize, stop: &AtomicBool) -> Result<u64, String> {
    let ns = File::open(netns).map_err(|e| format!("cannot open {netns}: {e}"))?;
    // SAFETY: setns with a namespace fd we hold open; it moves only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns({netns}): {}", io::Error::last_os_error()));
    }
    let name = CString::new("rltap0").map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(format!(
            "no rltap0 in {netns}: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: socket(2) has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(format!("packet socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new socket that nothing else owns or closes.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut frame = vec![0u8; len.max(14)];
    frame[0..6].fill(0xff);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0x12, 0x34]);
    // Local experimental ethertype: nothing in the guest or host acts on it.
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].fill(0xff);
    let mut sent = 0u64;
    let mut last_error = None;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..FLOOD_BURST {
            // SAFETY: `frame` and `addr` are live for the call, with the lengths given.
            let ret = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if ret < 0 {
                // ENOBUFS and the like while ember does not read: the frame is lost,
                // which is what a flood does.
                last_error = Some(io::Error::last_os_error());
            } else {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    match (sent, last_error) {
        (0, Some(e)) => Err(format!("no frame could be sent to rltap0: {e}")),
        _ => Ok(sent),
    }
}

/// Runs `ember` in `ns` with `--net tap=rltap0[,limits]` and the `net-rx-saturate`
/// scenario (`params` added to its command line) while the host floods the tap with
/// frames of `len` bytes.
fn rx_run(ns: &TapNamespace, guest: &Path, limits: &str, params: &str, len: usize) -> CapturedRun {
    let net = if limits.is_empty() {
        "tap=rltap0".to_string()
    } else {
        format!("tap=rltap0,{limits}")
    };
    let flood = Flood::start(ns, len);
    let run = run(
        ember(
            &["ip", "netns", "exec", ns.name()],
            guest,
            &["--net", &net],
            &format!("ember.test=net-rx-saturate {params}"),
        ),
        TIMEOUT,
    );
    let sent = flood
        .finish()
        .unwrap_or_else(|e| panic!("flooding the tap: {e}\n{}", run.context()));
    eprintln!("(the host sent {sent} frames of {len} bytes)");
    run
}

#[test]
fn net_rx_limits_hold_a_flooded_guest() {
    const TEST: &str = "net_rx_limits_hold_a_flooded_guest";
    if !kvm_available(TEST) {
        return;
    }
    let ns = match tap_namespace() {
        Ok(ns) => ns,
        Err(why) => return tap_unavailable(TEST, why),
    };
    let guest = guest();
    // The tap adds the 12-byte virtio-net header to every frame it hands ember; the
    // limiter charges it, and the guest counts it.
    const HDR: u64 = 12;

    // Bandwidth: 1 MiB/s, 128 KiB bucket, 256 KiB once; 4 MiB of 1526-byte frames
    // (1514-byte Ethernet frames and the header).
    let bucket = Bucket {
        size: 128 << 10,
        burst: 256 << 10,
        refill_ms: 125,
    };
    let eth = 1514;
    let frame = eth as u64 + HDR;
    let total = (4 << 20) / frame * frame;
    let params = format!("ember.bytes={total}");
    let limited = rx_run(&ns, &guest, &bucket.keys("rx_bw_"), &params, eth);
    let unlimited = rx_run(&ns, &guest, "", &params, eth);
    Measure {
        what: "virtio-net rx bandwidth",
        unit: "bytes",
        total,
        overdraft: frame,
        bucket,
        limited: &limited,
        unlimited: &unlimited,
    }
    .check();

    // Operations: 1000 frames/s, 100 at once; 2000 minimum-size frames.
    let bucket = Bucket {
        size: 100,
        burst: 0,
        refill_ms: 100,
    };
    let frames = 2000;
    let params = format!("ember.frames={frames}");
    let limited = rx_run(&ns, &guest, &bucket.keys("rx_ops_"), &params, 60);
    let unlimited = rx_run(&ns, &guest, "", &params, 60);
    Measure {
        what: "virtio-net rx ops",
        unit: "frames",
        total: frames,
        overdraft: 1,
        bucket,
        limited: &limited,
        unlimited: &unlimited,
    }
    .check();
}
