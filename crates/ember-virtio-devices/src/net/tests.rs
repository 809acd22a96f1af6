use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_virtio::InterruptKind;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::testutil::*;
use ember_rate_limiter::RateLimiterConfig;

/// An in-memory backend: frames to hand to the device, frames the device wrote.
#[derive(Clone, Default)]
struct Fake {
    rx: Arc<Mutex<VecDeque<Vec<u8>>>>,
    tx: Arc<Mutex<Vec<Vec<u8>>>>,
    fail_writes: bool,
}

impl NetBackend for Fake {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.rx.lock().unwrap().pop_front() {
            Some(frame) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        if self.fail_writes {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.tx.lock().unwrap().push(frame.to_vec());
        Ok(frame.len())
    }
}

/// A frame: zero header (num_buffers 0, as a tap leaves it) + `len` payload bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VIRTIO_NET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed));
    f
}

fn r(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, 0, 0)
}

fn w(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, WRITE, 0)
}

fn tx(m: &GuestMemoryMmap, descs: Vec<Descriptor>, backend: &mut Fake) -> TxOutcome {
    process_tx_chain(m, descs, backend, &mut FrameBuffer::new())
}

#[test]
fn features_config_and_mac() {
    let net = Net::with_backend(Box::new(Fake::default()), Some([2, 1, 2, 3, 4, 5]));
    let f = net.device_features();
    assert_eq!(
        f,
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
    );
    // No CSUM(0), GUEST_CSUM(1), GUEST_TSO4/6(7, 8), GUEST_ECN(9), GUEST_UFO(10),
    // HOST_TSO4/6(11, 12), HOST_ECN(13), HOST_UFO(14), MRG_RXBUF(15), USO (54-56).
    for bit in [0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 54, 55, 56] {
        assert_eq!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_eq!(net.device_type(), device_type::NET);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let mut cfg = [0xaau8; 10];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 1, 2, 3, 4, 5, 1, 0, 0xaa, 0xaa]);
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP);
    let mut net = net;
    net.write_config(0, &[0xff; 6]);
    assert_eq!(net.mac(), [2, 1, 2, 3, 4, 5]);

    let a = random_mac();
    assert_eq!(a[0], 0x02, "locally administered unicast");
    let b = Net::with_backend(Box::new(Fake::default()), None).mac();
    assert_eq!(b[0], 0x02);
    assert_ne!(a, b);
    assert!(format!("{net:?}").contains("02:01:02:03:04:05"));
}

#[test]
fn tx_gathers_readable_buffers() {
    let m = mem();
    let mut be = Fake::default();
    let f = frame(60, 1);
    fill(&m, DATA, &f[..20]);
    fill(&m, DATA + 0x1000, &f[20..]);
    let out = tx(&m, vec![r(DATA, 20), r(DATA + 0x1000, 52)], &mut be);
    assert_eq!(out, TxOutcome::Sent(72));
    assert_eq!(be.tx.lock().unwrap().as_slice(), &[f]);

    // Writable descriptors in a tx chain are ignored.
    let out = tx(&m, vec![r(DATA, 20), w(DATA + 0x1000, 52)], &mut be);
    assert_eq!(out, TxOutcome::Sent(20));
}

#[test]
fn tx_drops_bad_frames() {
    let m = mem();
    let mut be = Fake::default();
    // Exactly the limit is fine; one more byte is dropped.
    assert_eq!(
        tx(&m, vec![r(DATA, MAX_FRAME_LEN as u32)], &mut be),
        TxOutcome::Sent(MAX_FRAME_LEN)
    );
    assert_eq!(
        tx(
            &m,
            vec![r(DATA, MAX_FRAME_LEN as u32 - 1), r(DATA, 2)],
            &mut be
        ),
        TxOutcome::Dropped(DropReason::TooLong)
    );
    assert_eq!(
        tx(&m, vec![r(DATA, u32::MAX)], &mut be),
        TxOutcome::Dropped(DropReason::Malformed)
    );
    assert_eq!(
        tx(
            &m,
            vec![r(DATA, 0x8000_0000), r(DATA, 0x8000_0000)],
            &mut be
        ),
        TxOutcome::Dropped(DropReason::Malformed)
    );
    assert_eq!(
        tx(&m, vec![r(DATA, 11)], &mut be),
        TxOutcome::Dropped(DropReason::TooShort)
    );
    assert_eq!(
        tx(&m, vec![], &mut be),
        TxOutcome::Dropped(DropReason::TooShort)
    );
    assert_eq!(
        tx(&m, vec![w(DATA, 100)], &mut be),
        TxOutcome::Dropped(DropReason::TooShort)
    );
    assert_eq!(
        tx(&m, vec![r(MEM_SIZE - 20, 40)], &mut be),
        TxOutcome::Dropped(DropReason::Malformed)
    );
    assert_eq!(
        tx(&m, vec![r(u64::MAX - 10, 40)], &mut be),
        TxOutcome::Dropped(DropReason::Malformed)
    );
    // Offloads the driver cannot have negotiated.
    fill(&m, DATA, &[1, 0]); // NEEDS_CSUM
    assert_eq!(
        tx(&m, vec![r(DATA, 60)], &mut be),
        TxOutcome::Dropped(DropReason::Offload)
    );
    fill(&m, DATA, &[0, 1]); // GSO TCPv4
    assert_eq!(
        tx(&m, vec![r(DATA, 60)], &mut be),
        TxOutcome::Dropped(DropReason::Offload)
    );
    fill(&m, DATA, &[0, 0]);
    be.fail_writes = true;
    assert_eq!(
        tx(&m, vec![r(DATA, 60)], &mut be),
        TxOutcome::Dropped(DropReason::Backend)
    );
    assert_eq!(be.tx.lock().unwrap().len(), 1);
}

struct Rx<'a> {
    m: &'a GuestMemoryMmap,
    d: Driver<'a>,
    q: Queue,
    be: Fake,
    buffer: FrameBuffer,
}

impl<'a> Rx<'a> {
    fn new(m: &'a GuestMemoryMmap) -> Self {
        let d = Driver::new(m, 0, 16);
        let q = d.queue();
        Rx {
            m,
            d,
            q,
            be: Fake::default(),
            buffer: FrameBuffer::new(),
        }
    }

    fn run(&mut self) -> RxReport {
        process_rx(self.m, &mut self.q, &mut self.be, &mut self.buffer, 64)
    }

    fn push(&self, f: Vec<u8>) {
        self.be.rx.lock().unwrap().push_back(f);
    }

    fn pending(&self) -> usize {
        self.be.rx.lock().unwrap().len()
    }
}

#[test]
fn rx_delivers_frames_with_num_buffers_1() {
    let m = mem();
    let mut rx = Rx::new(&m);
    rx.d.add(&[(DATA, 1000, true), (DATA + 0x1000, 1000, true)]);
    rx.d.add(&[(DATA + 0x2000, 1526, true)]);
    let f1 = frame(1500, 3);
    let f2 = frame(60, 4);
    rx.push(f1.clone());
    rx.push(f2.clone());
    let rep = rx.run();
    assert_eq!(rep.delivered, 2);
    assert_eq!(rep.used, 2);
    // Both buffers used: processing stops for want of buffers.
    assert_eq!(rep.stop, RxStop::NoBuffers);
    assert_eq!(rx.d.used(0).1, f1.len() as u32);
    assert_eq!(rx.d.used(1).1, f2.len() as u32);
    let mut got = read(&m, DATA, 1000);
    got.extend(read(&m, DATA + 0x1000, f1.len() - 1000));
    let mut want = f1;
    want[10] = 1; // num_buffers
    assert_eq!(got, want);
    let got2 = read(&m, DATA + 0x2000, f2.len());
    assert_eq!(&got2[..10], &[0u8; 10]);
    assert_eq!(&got2[10..12], &[1, 0]);
    assert_eq!(&got2[12..], &f2[12..]);
}

#[test]
fn rx_without_buffers_leaves_frames_queued() {
    let m = mem();
    let mut rx = Rx::new(&m);
    rx.push(frame(100, 1));
    let rep = rx.run();
    assert_eq!(rep.stop, RxStop::NoBuffers);
    assert_eq!(rep.used, 0);
    assert_eq!(
        rx.pending(),
        1,
        "a frame was consumed with nowhere to put it"
    );
    // Buffers arrive: the frame goes out.
    rx.d.add(&[(DATA, 2000, true)]);
    let rep = rx.run();
    assert_eq!((rep.delivered, rep.stop), (1, RxStop::NoBuffers));
    // A buffer with no frame waiting stays with the device.
    rx.d.add(&[(DATA, 2000, true)]);
    let rep = rx.run();
    assert_eq!((rep.used, rep.stop), (0, RxStop::BackendEmpty));
    rx.push(frame(100, 2));
    assert_eq!(rx.run().delivered, 1);
    assert_eq!(rx.d.used_idx(), 2);
}

#[test]
fn rx_drops_frames_that_do_not_fit_and_keeps_the_buffer() {
    let m = mem();
    let mut rx = Rx::new(&m);
    rx.d.add(&[(DATA, 1526, true)]);
    rx.push(frame(9000, 1)); // jumbo: does not fit 1526
    rx.push(vec![0u8; 5]); // shorter than the header
    let mut csum = frame(100, 2);
    csum[0] = 1; // NEEDS_CSUM, never negotiated
    rx.push(csum);
    rx.push(frame(MAX_FRAME_LEN, 9)); // larger than the bounce buffer: truncated, dropped
    let ok = frame(200, 3);
    rx.push(ok.clone());
    let rep = rx.run();
    assert_eq!(rep.dropped, 4);
    assert_eq!(rep.delivered, 1);
    assert_eq!(rx.d.used_idx(), 1);
    assert_eq!(rx.d.used(0), (0, ok.len() as u32));
    assert_eq!(&read(&m, DATA + 12, 200)[..], &ok[12..]);
}

#[test]
fn rx_returns_malformed_buffers_empty() {
    let m = mem();
    let mut rx = Rx::new(&m);
    rx.d.add(&[(DATA, 2000, false)]); // readable only
    rx.d.add(&[(MEM_SIZE - 100, 2000, true)]); // out of memory
    rx.d.add(&[(DATA, 20, true)]); // too small for anything
    rx.d.add(&[(DATA, 2000, true), (DATA, 10, false)]); // misordered
    rx.d.add(&[(DATA, 2000, true)]);
    rx.push(frame(100, 1));
    let rep = rx.run();
    assert_eq!((rep.bad_buffers, rep.delivered, rep.used), (4, 1, 5));
    for i in 0..4 {
        assert_eq!(rx.d.used(i).1, 0);
    }
    assert_eq!(rx.d.used(4).1, 112);
}

#[test]
fn rx_budget_bounds_work() {
    let m = mem();
    let d = Driver::new(&m, 0, 16);
    let mut q = d.queue();
    let mut be = Fake::default();
    for _ in 0..100 {
        be.rx.lock().unwrap().push_back(frame(9000, 0));
    }
    d.store(0, &[w(DATA, 1526)]);
    d.publish(0);
    let rep = process_rx(&m, &mut q, &mut be, &mut FrameBuffer::new(), 10);
    assert_eq!((rep.dropped, rep.stop), (10, RxStop::Budget));
    assert_eq!(be.rx.lock().unwrap().len(), 90);
}

/// A backend over a datagram socket pair: a real fd for the worker's epoll.
struct Sock(UnixDatagram);

impl NetBackend for Sock {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.0.send(frame)
    }

    fn rx_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

/// CPU time (user + system, clock ticks) of this process's threads named `comm`.
fn thread_ticks(comm: &str) -> Option<u64> {
    let mut total = None;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path();
        let Ok(name) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if name.trim() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after "pid (comm) ".
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        total = Some(total.unwrap_or(0) + ticks);
    }
    total
}

/// A stream backend whose peer can hang up.
struct Stream(std::os::unix::net::UnixStream);

impl NetBackend for Stream {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::io::Read::read(&mut self.0, buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        std::io::Write::write(&mut self.0, frame)
    }

    fn rx_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

#[test]
fn backend_hang_up_does_not_spin() {
    let (dev_end, peer) = std::os::unix::net::UnixStream::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    let mut net = Net::with_backend(Box::new(Stream(dev_end)), None);
    let m = mem();
    let mut rxd = Driver::new(&m, 0, 16);
    let txd = Driver::new(&m, 0x8000, 16);
    rxd.add(&[(DATA, 2048, true)]);
    let (rxq, _k1) = active_queue(0, &rxd);
    let (txq, _k2) = active_queue(1, &txd);
    net.activate(Activation {
        mem: std::sync::Arc::new(m.clone()),
        queues: vec![rxq, txq],
        interrupt: RecordingInterrupt::new(),
        features: 0,
        thread_hook: None,
        spawner: None,
    })
    .unwrap();
    // The peer goes away: the fd polls readable (EOF) and hung up for ever.
    drop(peer);
    std::thread::sleep(Duration::from_millis(300));
    if let Some(ticks) = thread_ticks("ember-virtio-ne") {
        assert!(
            ticks < 10,
            "the net worker spun on a hung-up backend: {ticks} ticks"
        );
    }
    assert_eq!(rxd.used_idx(), 0);
    net.reset();
}

#[test]
fn worker_moves_frames_both_ways() {
    let (dev_end, host) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut net = Net::with_backend(Box::new(Sock(dev_end)), None);
    let m = mem();
    let mut rxd = Driver::new(&m, 0, 256);
    let mut txd = Driver::new(&m, 0x8000, 256);
    let (rxq, rx_kick) = active_queue(0, &rxd);
    let (txq, tx_kick) = active_queue(1, &txd);
    let irq = RecordingInterrupt::new();
    net.activate(Activation {
        mem: std::sync::Arc::new(m.clone()),
        queues: vec![rxq, txq],
        interrupt: irq.clone(),
        features: net.device_features(),
        thread_hook: None,
        spawner: None,
    })
    .unwrap();

    // A frame arrives before the driver posted any rx buffer: the worker must wait for
    // the rx notification without spinning on the readable socket.
    let f1 = frame(100, 1);
    host.send(&f1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rxd.used_idx(), 0);
    if let Some(ticks) = thread_ticks("ember-virtio-ne") {
        assert!(
            ticks < 10,
            "the net worker used {ticks} ticks waiting for rx buffers"
        );
    }

    rxd.add(&[(DATA, 2048, true)]);
    rx_kick.write(1).unwrap();
    assert!(rxd.wait_used(1), "f1 was not delivered");
    assert_eq!(rxd.used(0).1, f1.len() as u32);
    assert!(irq.wait_for(InterruptKind::Queue(0)));

    // With a buffer posted, a new frame is picked up from the socket by itself.
    rxd.add(&[(DATA + 0x1000, 2048, true)]);
    rx_kick.write(1).unwrap();
    let f2 = frame(300, 2);
    host.send(&f2).unwrap();
    assert!(rxd.wait_used(2), "f2 was not delivered");
    assert_eq!(&read(&m, DATA + 0x1000 + 12, 300)[..], &f2[12..]);

    // tx.
    let f3 = frame(500, 3);
    fill(&m, DATA + 0x10000, &f3);
    txd.add(&[
        (DATA + 0x10000, 12, false),
        (DATA + 0x10000 + 12, 500, false),
    ]);
    tx_kick.write(1).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = host.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &f3[..]);
    assert!(txd.wait_used(1));
    assert_eq!(txd.used(0).1, 0);
    assert!(irq.wait_for(InterruptKind::Queue(1)));

    // Reset returns the backend; the device can be activated again.
    net.reset();
    let rxd2 = Driver::new(&m, 0x10000, 16);
    let txd2 = Driver::new(&m, 0x18000, 16);
    let (rxq, _k1) = active_queue(0, &rxd2);
    let (txq, _k2) = active_queue(1, &txd2);
    net.activate(Activation {
        mem: std::sync::Arc::new(m.clone()),
        queues: vec![rxq, txq],
        interrupt: irq,
        features: 0,
        thread_hook: None,
        spawner: None,
    })
    .unwrap();
    net.reset();
}

fn bucket(size: u64, refill_time_ms: u64) -> Option<ember_rate_limiter::TokenBucketConfig> {
    Some(ember_rate_limiter::TokenBucketConfig {
        size,
        one_time_burst: 0,
        refill_time_ms,
    })
}

fn limits(
    bandwidth: Option<ember_rate_limiter::TokenBucketConfig>,
    ops: Option<ember_rate_limiter::TokenBucketConfig>,
) -> RateLimiterConfig {
    RateLimiterConfig { bandwidth, ops }
}

/// A net device on a datagram socket pair, activated with fresh queues at `base`.
struct Limited<'a> {
    net: Net,
    host: UnixDatagram,
    rxd: Driver<'a>,
    txd: Driver<'a>,
    rx_kick: vmm_sys_util::eventfd::EventFd,
    tx_kick: vmm_sys_util::eventfd::EventFd,
}

impl<'a> Limited<'a> {
    fn new(m: &'a GuestMemoryMmap, rx: RateLimiterConfig, tx: RateLimiterConfig) -> Self {
        let (dev_end, host) = UnixDatagram::pair().unwrap();
        dev_end.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let mut net = Net::with_backend(Box::new(Sock(dev_end)), None);
        net.set_rate_limiters(rx, tx).unwrap();
        let rxd = Driver::new(m, 0, 16);
        let txd = Driver::new(m, 0x8000, 16);
        let (rx_kick, tx_kick) = Self::activate(&mut net, m, &rxd, &txd);
        Limited {
            net,
            host,
            rxd,
            txd,
            rx_kick,
            tx_kick,
        }
    }

    fn activate(
        net: &mut Net,
        m: &GuestMemoryMmap,
        rxd: &Driver<'_>,
        txd: &Driver<'_>,
    ) -> (
        vmm_sys_util::eventfd::EventFd,
        vmm_sys_util::eventfd::EventFd,
    ) {
        let (rxq, rx_kick) = active_queue(0, rxd);
        let (txq, tx_kick) = active_queue(1, txd);
        net.activate(Activation {
            mem: std::sync::Arc::new(m.clone()),
            queues: vec![rxq, txq],
            interrupt: RecordingInterrupt::new(),
            features: 0,
            thread_hook: None,
            spawner: None,
        })
        .unwrap();
        (rx_kick, tx_kick)
    }

    /// Frames the host side has received so far.
    fn host_frames(&self) -> usize {
        let mut buf = vec![0u8; 4096];
        let mut n = 0;
        while self.host.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

/// Queues `count` tx chains of `len` bytes (a zero header and payload) at `at`.
fn queue_tx(m: &GuestMemoryMmap, txd: &mut Driver<'_>, at: u64, count: u64, len: usize) {
    for i in 0..count {
        let f = frame(len - VIRTIO_NET_HDR_LEN, i as u8);
        let addr = at + i * 0x1000;
        fill(m, addr, &f);
        txd.add(&[(addr, len as u32, false)]);
    }
}

#[test]
fn invalid_limits_name_the_direction() {
    let mut net = Net::with_backend(Box::new(Fake::default()), None);
    let err = net
        .set_rate_limiters(RateLimiterConfig::default(), limits(bucket(0, 10), None))
        .unwrap_err();
    let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(
        msg.contains("virtio-net tx") && msg.contains("size"),
        "{msg}"
    );
    assert_eq!(
        net.rate_limits(),
        (RateLimiterConfig::default(), RateLimiterConfig::default())
    );
}

/// tx limited to 1000 bytes an hour: frames of 300 bytes go out until the bucket is
/// short (the fourth goes into debt); the rest stay in the ring, also across a reset.
#[test]
fn tx_limit_leaves_chains_in_the_ring() {
    let m = mem();
    let mut dev = Limited::new(
        &m,
        RateLimiterConfig::default(),
        limits(bucket(1000, 3_600_000), None),
    );
    queue_tx(&m, &mut dev.txd, DATA, 6, 300);
    dev.tx_kick.write(1).unwrap();
    assert!(dev.txd.wait_used(4), "the first frames were not sent");
    // More would come within the hour; give it time to go wrong.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        dev.txd.used_idx(),
        4,
        "the tx limiter let a fifth frame out"
    );
    assert_eq!(dev.host_frames(), 4);

    dev.net.reset();
    let rxd = Driver::new(&m, 0x10000, 16);
    let mut txd = Driver::new(&m, 0x18000, 16);
    queue_tx(&m, &mut txd, DATA + 0x20000, 1, 64);
    let _kicks = Limited::activate(&mut dev.net, &m, &rxd, &txd);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(txd.used_idx(), 0, "a reset refilled the tx bucket");
    assert_eq!(dev.host_frames(), 0);
    dev.net.reset();
}

/// tx limited to 2 frames an hour: the third goes into debt, the rest wait.
#[test]
fn tx_ops_limit_counts_frames() {
    let m = mem();
    let mut dev = Limited::new(
        &m,
        RateLimiterConfig::default(),
        limits(None, bucket(2, 3_600_000)),
    );
    queue_tx(&m, &mut dev.txd, DATA, 6, 64);
    dev.tx_kick.write(1).unwrap();
    assert!(dev.txd.wait_used(3), "the first frames were not sent");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        dev.txd.used_idx(),
        3,
        "the ops limit let a fourth frame out"
    );
    assert_eq!(dev.host_frames(), 3);
    dev.net.reset();
}

/// rx limited to 1000 bytes an hour: frames stay in the backend once the bucket is
/// short, and the worker does not spin on the readable socket meanwhile.
#[test]
fn rx_limit_stops_reading_the_backend() {
    let m = mem();
    let mut dev = Limited::new(
        &m,
        limits(bucket(1000, 3_600_000), None),
        RateLimiterConfig::default(),
    );
    for i in 0..8 {
        dev.rxd.add(&[(DATA + i * 0x1000, 2048, true)]);
    }
    dev.rx_kick.write(1).unwrap();
    for i in 0..6 {
        dev.host.send(&frame(288, i)).unwrap();
    }
    assert!(dev.rxd.wait_used(4), "the first frames were not delivered");
    let ticks_before = thread_ticks("ember-virtio-ne");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dev.rxd.used_idx(), 4, "the rx limiter let a fifth frame in");
    if let (Some(before), Some(after)) = (ticks_before, thread_ticks("ember-virtio-ne")) {
        assert!(
            after - before < 10,
            "the net worker spun while rx was blocked: {} ticks",
            after - before
        );
    }
    // More rx buffers do not help while blocked.
    dev.rxd.add(&[(DATA + 0x10000, 2048, true)]);
    dev.rx_kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(dev.rxd.used_idx(), 4);
    dev.net.reset();
}

/// rx limited to 1000 bytes per 100 ms: the frames past the bucket arrive when the
/// timer fires, not before.
#[test]
fn rx_timer_resumes_reading() {
    let m = mem();
    let start = std::time::Instant::now();
    let mut dev = Limited::new(
        &m,
        limits(bucket(1000, 100), None),
        RateLimiterConfig::default(),
    );
    for i in 0..8 {
        dev.rxd.add(&[(DATA + i * 0x1000, 2048, true)]);
    }
    dev.rx_kick.write(1).unwrap();
    for i in 0..6 {
        dev.host.send(&frame(288, i)).unwrap();
    }
    assert!(
        dev.rxd.wait_used(6),
        "the limiter never let the last frames in"
    );
    // 1800 bytes through a 1000-byte bucket at 10 bytes/ms: the fourth frame goes 200
    // bytes into debt, the fifth (after 20 ms) 300 more; the sixth is read after at
    // least 500 bytes of refill, 50 ms.
    assert!(start.elapsed() >= Duration::from_millis(50));
    dev.net.reset();
}
