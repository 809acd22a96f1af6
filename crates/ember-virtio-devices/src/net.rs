//! virtio-net (virtio 1.2, section 5.1) on a tap interface, or any [`NetBackend`].
//!
//! Queue 0 receives (rx), queue 1 transmits (tx). Every packet, in both directions,
//! starts with the 12-byte `virtio_net_hdr_v1` (`flags`, `gso_type`, `hdr_len`,
//! `gso_size`, `csum_start`, `csum_offset`, `num_buffers`); the tap, opened with
//! `IFF_VNET_HDR` and a header size of 12, uses the same header, so frames pass through
//! unchanged except that rx sets `num_buffers` to 1.
//!
//! **No offloads.** Offloads are on only when both sides agree, and Ember offers none:
//! no `CSUM`, `GUEST_CSUM`, TSO, UFO or USO bits, and no `MRG_RXBUF`, so none is ever
//! negotiated and the tap is configured with `TUNSETOFFLOAD(0)`. Headers are therefore
//! all zeroes (with `num_buffers = 1` on rx); a tx packet asking for a checksum or for
//! segmentation, and an rx frame from the backend that would need either, is dropped.
//!
//! tx: each chain's readable buffers (at most [`MAX_FRAME_LEN`] bytes) are gathered and
//! written to the backend in one write; anything longer, shorter than the header or
//! malformed is dropped (the chain completes with used length 0, as every tx chain does).
//!
//! rx: while the backend is readable and the driver has posted rx buffers, one frame is
//! read into a bounce buffer and copied into the next buffer; a frame that does not fit
//! that buffer is dropped and the buffer kept for the next frame. With no rx buffer left,
//! the worker stops polling the backend until the driver notifies the rx queue, so
//! nothing busy-loops.
//!
//! **Rate limiting** ([`Net::set_rate_limiters`]): rx and tx each have a limiter; every
//! frame costs one token of the operations bucket and its length (the 12-byte header
//! included; on tx, the length the guest gave, even for a frame that is then dropped)
//! from the bandwidth bucket, charged when the frame is done (what a bucket lacks
//! becomes a debt). While the tx limiter is blocked, tx chains stay in the ring;
//! while the rx limiter is blocked, the worker stops reading the backend (and polling the
//! tap). Either resumes when its limiter's timer, one of the worker's backend fds, fires.
//! A guest gets at most one frame beyond its limit, and then waits for it.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use ember_rate_limiter::{
    warn_limited, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState,
};
use ember_virtio::{
    device_type, ActivateDevice, ActivateError, Activation, ActiveQueue, PauseError, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};

use crate::limited::{charge_done, handle_timer, serve_limited};
use crate::tap::Tap;
use crate::VirtioDeviceError;
use crate::{read_config_bytes, QUEUE_MAX_SIZE};
use ember_virtio::chain::{walk_into, ChainLayout, Cursor};
use ember_virtio::worker::{pop_chain, Pop, QueueHandler, Worker, WorkerContext, QUEUE_BUDGET};

/// Feature bit: the device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature bit: the configuration space has a link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Link status bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Bytes of `virtio_net_hdr_v1`.
pub const VIRTIO_NET_HDR_LEN: usize = 12;
/// Largest packet, header included: 12 + 64 KiB + a 14-byte Ethernet header.
pub const MAX_FRAME_LEN: usize = VIRTIO_NET_HDR_LEN + 65536 + 14;
/// Smallest rx buffer that can hold anything: header plus an Ethernet header.
const MIN_RX_BUFFER: u64 = (VIRTIO_NET_HDR_LEN + 14) as u64;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// Frames received per wake-up before the worker looks at other events.
pub const RX_BUDGET: usize = 256;

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// Where packets go and come from: a tap ([`Tap`]) in production, anything in tests.
///
/// Frames include the 12-byte `virtio_net_hdr_v1`.
pub trait NetBackend: Send {
    /// Reads one frame into `buf`, returning its length; `WouldBlock` when none is
    /// waiting. Must not block.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame, returning the bytes written.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;

    /// A file descriptor that polls readable while [`NetBackend::read_frame`] has a frame
    /// (the tap's own fd). `None`: the worker reads only when the rx queue is notified.
    fn rx_fd(&self) -> Option<RawFd> {
        None
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, frame)
    }

    fn rx_fd(&self) -> Option<RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(self))
    }
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The chain is out of guest memory, misordered or too long.
    Malformed,
    /// Shorter than the 12-byte header.
    TooShort,
    /// Longer than [`MAX_FRAME_LEN`] (tx) or than the rx buffer.
    TooLong,
    /// The header asks for an offload (checksum or segmentation) that is not negotiated.
    Offload,
    /// The backend failed to take the frame.
    Backend,
}

/// What [`process_tx_chain`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    /// The frame (this many bytes, header included) went to the backend.
    Sent(usize),
    /// The frame was dropped.
    Dropped(DropReason),
}

/// Whether a header asks for an offload Ember never negotiates.
fn wants_offload(hdr: &[u8]) -> bool {
    hdr[0] & HDR_F_NEEDS_CSUM != 0 || hdr[1] != 0
}

/// Working memory for [`process_tx_chain`] and [`process_rx`], kept per queue so that a
/// frame does not allocate: the frame's bounce buffer and the chain's layout.
///
/// ```
/// use ember_virtio_devices::net::{FrameBuffer, MAX_FRAME_LEN};
///
/// assert_eq!(FrameBuffer::new().len(), MAX_FRAME_LEN);
/// ```
#[derive(Debug)]
pub struct FrameBuffer {
    frame: Vec<u8>,
    layout: ChainLayout,
}

impl Default for FrameBuffer {
    fn default() -> Self {
        FrameBuffer::new()
    }
}

impl FrameBuffer {
    /// A buffer for frames of up to [`MAX_FRAME_LEN`] bytes.
    pub fn new() -> Self {
        FrameBuffer::with_len(MAX_FRAME_LEN)
    }

    /// A buffer of `len` bytes: a shorter one than [`MAX_FRAME_LEN`] lowers the frame
    /// limit (tests and fuzzing use that).
    pub fn with_len(len: usize) -> Self {
        FrameBuffer {
            frame: vec![0; len],
            layout: ChainLayout::default(),
        }
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.frame.len()
    }

    /// Whether the buffer has no room at all (then every frame is dropped).
    pub fn is_empty(&self) -> bool {
        self.frame.is_empty()
    }
}

/// Sends one tx chain: gathers its readable buffers into `buffer` (which must hold
/// [`MAX_FRAME_LEN`] bytes; a shorter one lowers the limit) and writes them to
/// `backend` in one write. The used length of a tx chain is always 0.
pub fn process_tx_chain<M, I>(
    mem: &M,
    chain: I,
    backend: &mut dyn NetBackend,
    buffer: &mut FrameBuffer,
) -> TxOutcome
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let FrameBuffer {
        frame: bounce,
        layout,
    } = buffer;
    walk_into(layout, mem, chain);
    if layout.too_long || layout.out_of_bounds {
        return TxOutcome::Dropped(DropReason::Malformed);
    }
    let limit = MAX_FRAME_LEN.min(bounce.len()) as u64;
    if layout.readable_len > limit {
        return TxOutcome::Dropped(DropReason::TooLong);
    }
    if layout.readable_len < VIRTIO_NET_HDR_LEN as u64 {
        return TxOutcome::Dropped(DropReason::TooShort);
    }
    // readable_len <= MAX_FRAME_LEN.
    let len = layout.readable_len as usize;
    if Cursor::new(&layout.readable)
        .read(mem, &mut bounce[..len])
        .is_err()
    {
        return TxOutcome::Dropped(DropReason::Malformed);
    }
    if wants_offload(&bounce[..VIRTIO_NET_HDR_LEN]) {
        return TxOutcome::Dropped(DropReason::Offload);
    }
    match backend.write_frame(&bounce[..len]) {
        Ok(_) => TxOutcome::Sent(len),
        Err(e) => {
            warn_limited!("virtio-net: backend write of {len} bytes failed: {e}");
            TxOutcome::Dropped(DropReason::Backend)
        }
    }
}

/// Why [`process_rx`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RxStop {
    /// The driver has no rx buffer posted (notifications are enabled so it will say when
    /// it adds some).
    #[default]
    NoBuffers,
    /// The backend has no frame waiting.
    BackendEmpty,
    /// The budget ran out; more may be waiting.
    Budget,
    /// The backend returned an error.
    BackendError,
}

/// What [`process_rx`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxReport {
    /// Frames copied into rx buffers.
    pub delivered: usize,
    /// Frames read from the backend and dropped (too short, too long, offload).
    pub dropped: usize,
    /// Malformed rx buffers returned to the driver with used length 0.
    pub bad_buffers: usize,
    /// Used entries added (delivered + bad buffers).
    pub used: usize,
    /// Chains skipped because their head index was past the queue size: consumed, with
    /// no used entry (they name no descriptor).
    pub skipped: usize,
    /// Why processing stopped.
    pub stop: RxStop,
}

/// Moves frames from `backend` into the rx `queue`'s buffers until the backend is empty,
/// the driver has no buffer, or `budget` iterations (each consuming a frame or a buffer)
/// have run. `buffer` should hold [`MAX_FRAME_LEN`] bytes ([`FrameBuffer::new`]).
pub fn process_rx<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    backend: &mut dyn NetBackend,
    buffer: &mut FrameBuffer,
    budget: usize,
) -> RxReport {
    let FrameBuffer {
        frame: bounce,
        layout,
    } = buffer;
    let mut report = RxReport::default();
    for _ in 0..budget {
        // `pop_chain` checks the avail index and the head, which virtio-queue leaves to
        // us (logging an error line on every pop, as often as the guest likes).
        let chain = match pop_chain(mem, queue) {
            Pop::Chain(chain) => chain,
            // No used entry for a head that names no descriptor; it counts against the
            // budget like any chain.
            Pop::BadHead(_) => {
                report.skipped += 1;
                continue;
            }
            Pop::InvalidAvailIndex => {
                report.stop = RxStop::NoBuffers;
                return report;
            }
            Pop::Empty => {
                // Ask to be notified when buffers arrive, then look once more (the driver
                // may have added some in between).
                let again = matches!(queue.enable_notification(mem), Ok(true));
                match again.then(|| pop_chain(mem, queue)) {
                    Some(Pop::Chain(chain)) => chain,
                    Some(Pop::BadHead(_)) => {
                        report.skipped += 1;
                        continue;
                    }
                    _ => {
                        report.stop = RxStop::NoBuffers;
                        return report;
                    }
                }
            }
        };
        let head = chain.head_index();
        walk_into(layout, mem, chain);
        if !layout.is_sound() || layout.writable_len < MIN_RX_BUFFER {
            add_used(queue, mem, head, 0);
            report.bad_buffers += 1;
            report.used += 1;
            continue;
        }
        let n = match backend.read_frame(bounce) {
            Ok(0) => {
                queue.go_to_previous_position();
                report.stop = RxStop::BackendEmpty;
                return report;
            }
            Ok(n) => n,
            Err(e) => {
                queue.go_to_previous_position();
                match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        report.stop = RxStop::BackendEmpty;
                        return report;
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        warn_limited!("virtio-net: backend read failed: {e}");
                        report.stop = RxStop::BackendError;
                        return report;
                    }
                }
            }
        };
        let fits = n <= bounce.len() && n as u64 <= layout.writable_len;
        if !fits || n < VIRTIO_NET_HDR_LEN || wants_offload(&bounce[..VIRTIO_NET_HDR_LEN]) {
            // Drop the frame; the buffer stays for the next one.
            queue.go_to_previous_position();
            report.dropped += 1;
            continue;
        }
        let frame = &mut bounce[..n];
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        let used = match Cursor::new(&layout.writable).write(mem, frame) {
            Ok(()) => {
                report.delivered += 1;
                n as u32
            }
            Err(_) => {
                report.bad_buffers += 1;
                0
            }
        };
        add_used(queue, mem, head, used);
        report.used += 1;
    }
    report.stop = RxStop::Budget;
    report
}

fn add_used<M: GuestMemory>(queue: &mut Queue, mem: &M, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        warn_limited!("virtio-net: cannot add used entry for head {head}: {e}");
    }
}

/// A virtio-net device.
///
/// Two queues (rx, tx) of up to [`QUEUE_MAX_SIZE`] entries. Features offered:
/// `VERSION_1`, `RING_EVENT_IDX`, `RING_INDIRECT_DESC`, `MAC`, `STATUS`, and no offloads.
/// Configuration space: `mac` at 0 (6 bytes), `status` (u16, link up) at 6.
pub struct Net {
    backend: Option<Box<dyn NetBackend>>,
    mac: [u8; 6],
    config: [u8; 8],
    worker: Option<Worker<NetHandler>>,
    /// The limits given to [`Net::set_rate_limiters`]: rx, tx.
    rate_limits: (RateLimiterConfig, RateLimiterConfig),
    /// The limiters while the device is inactive (the worker has them while active).
    /// They survive resets, so a guest cannot refill its buckets by resetting.
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    /// New limiters were set while the worker ran: drop its old ones on reset.
    limiters_replaced: bool,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("mac", &format_mac(&self.mac))
            .field("has_backend", &self.backend.is_some())
            .field("worker", &self.worker)
            .field("rate_limits", &self.rate_limits)
            .finish()
    }
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random locally administered unicast MAC address, `02:xx:xx:xx:xx:xx`.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0x02, 0, 0, 0, 0, 0];
    if crate::rng::fill_random(&mut mac[1..]).is_err() {
        // No getrandom: fall back to something that differs between processes and runs.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seed = (u64::from(std::process::id()) << 32) ^ u64::from(nanos);
        mac[1..].copy_from_slice(&seed.to_le_bytes()[..5]);
    }
    mac
}

impl Net {
    /// Opens tap interface `tap_name` (see [`Tap::open`]); `mac` defaults to
    /// [`random_mac`].
    pub fn new(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Net, VirtioDeviceError> {
        let tap = Tap::open(tap_name)?;
        Ok(Net::with_backend(Box::new(tap), mac))
    }

    /// A device on any backend; `mac` defaults to [`random_mac`].
    pub fn with_backend(backend: Box<dyn NetBackend>, mac: Option<[u8; 6]>) -> Net {
        let mac = mac.unwrap_or_else(random_mac);
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        Net {
            backend: Some(backend),
            mac,
            config,
            worker: None,
            rate_limits: Default::default(),
            rx_limiter: None,
            tx_limiter: None,
            limiters_replaced: false,
        }
    }

    /// The MAC address in the configuration space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Limits received frames to `rx` and transmitted frames to `tx`: each frame takes
    /// one token from the operations bucket and its length, header included, from the
    /// bandwidth bucket (see the [module documentation](self)). A config with no bucket
    /// means no limit. Call it before activation; on an active device the new limits
    /// apply from the next activation. Errors name the direction and the bad value.
    ///
    /// ```
    /// use ember_virtio_devices::net::{Net, NetBackend};
    /// use ember_rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    ///
    /// struct Loopback;
    /// impl NetBackend for Loopback {
    ///     fn read_frame(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
    ///         Err(std::io::ErrorKind::WouldBlock.into())
    ///     }
    ///     fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
    ///         Ok(frame.len())
    ///     }
    /// }
    ///
    /// let mut net = Net::with_backend(Box::new(Loopback), None);
    /// // tx: 10 MB/s; rx: 1000 frames a second.
    /// let tx = RateLimiterConfig {
    ///     bandwidth: Some(TokenBucketConfig { size: 1_000_000, one_time_burst: 0, refill_time_ms: 100 }),
    ///     ops: None,
    /// };
    /// let rx = RateLimiterConfig {
    ///     bandwidth: None,
    ///     ops: Some(TokenBucketConfig { size: 100, one_time_burst: 0, refill_time_ms: 100 }),
    /// };
    /// net.set_rate_limiters(rx, tx)?;
    /// assert_eq!(net.rate_limits(), (rx, tx));
    /// # Ok::<(), ember_virtio_devices::VirtioDeviceError>(())
    /// ```
    pub fn set_rate_limiters(
        &mut self,
        rx: RateLimiterConfig,
        tx: RateLimiterConfig,
    ) -> Result<(), VirtioDeviceError> {
        let err = |dir: &'static str| {
            move |source| VirtioDeviceError::RateLimiter {
                device: format!("virtio-net {dir}"),
                source,
            }
        };
        let rx_limiter = new_limiter(&rx).map_err(err("rx"))?;
        let tx_limiter = new_limiter(&tx).map_err(err("tx"))?;
        self.rx_limiter = rx_limiter;
        self.tx_limiter = tx_limiter;
        self.rate_limits = (rx, tx);
        self.limiters_replaced = self.worker.is_some();
        Ok(())
    }

    /// The limits set with [`Net::set_rate_limiters`]: (rx, tx).
    pub fn rate_limits(&self) -> (RateLimiterConfig, RateLimiterConfig) {
        self.rate_limits
    }
}

/// A limiter for `config`, or none when it limits nothing.
fn new_limiter(config: &RateLimiterConfig) -> Result<Option<RateLimiter>, RateLimiterError> {
    if config.is_unlimited() {
        return Ok(None);
    }
    RateLimiter::new(config).map(Some)
}

/// The rx side of the backend seen through the rx limiter: no frame while it is blocked,
/// and every frame read charged to it.
struct LimitedRx<'a> {
    backend: &'a mut dyn NetBackend,
    limiter: &'a mut RateLimiter,
}

impl NetBackend for LimitedRx<'_> {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.limiter.is_blocked() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.backend.read_frame(buf)?;
        charge_done(self.limiter, n as u64);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.backend.write_frame(frame)
    }

    fn rx_fd(&self) -> Option<RawFd> {
        self.backend.rx_fd()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE, QUEUE_MAX_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only in virtio 1.x (no VIRTIO_NET_F_CTRL_MAC_ADDR either).
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            if let Some(handler) = worker.stop() {
                self.take_back(handler);
            }
            self.limiters_replaced = false;
        }
    }

    /// Two states: rx, then tx.
    fn save_rate_limiters(&mut self) -> Vec<RateLimiterState> {
        crate::limited::save_limiters([self.rx_limiter.as_mut(), self.tx_limiter.as_mut()])
    }

    fn restore_rate_limiters(
        &mut self,
        states: &[RateLimiterState],
    ) -> Result<(), RateLimiterError> {
        crate::limited::restore_limiters(
            [self.rx_limiter.as_mut(), self.tx_limiter.as_mut()],
            states,
        )
    }

    /// Stops the worker after the frame in flight (an rx pass ends within
    /// [`RX_BUDGET`] frames) and gives back both queues. The backend (the tap) stays
    /// open with the device; frames arriving meanwhile wait in it. The rate limiters,
    /// buckets and debts included, stay with the device for the next activation.
    fn pause(&mut self) -> Result<Vec<ActiveQueue>, PauseError> {
        let Some(worker) = self.worker.take() else {
            return Err(PauseError::NotRunning {
                device_type: device_type::NET,
            });
        };
        let stopped = worker.stop_keeping_queues();
        let result = match stopped {
            Some((handler, queues)) => {
                self.take_back(handler);
                Ok(queues)
            }
            None => Err(PauseError::WorkerLost {
                device_type: device_type::NET,
            }),
        };
        self.limiters_replaced = false;
        result
    }
}

impl Net {
    /// Keeps the backend and limiters of a stopped worker's handler.
    fn take_back(&mut self, handler: NetHandler) {
        self.backend = Some(handler.backend);
        if !self.limiters_replaced {
            self.rx_limiter = handler.rx_limiter;
            self.tx_limiter = handler.tx_limiter;
        }
    }
}

impl<M: GuestAddressSpace + Send + 'static> ActivateDevice<M> for Net {
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Other("virtio-net is already active".into()));
        }
        if activation.queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: activation.queues.len(),
            });
        }
        let Some(backend) = self.backend.take() else {
            return Err(ActivateError::Other(
                "virtio-net lost its backend (its worker panicked)".into(),
            ));
        };
        // Limiters lost with a worker that panicked start again from the settings.
        let limiter = |kept: Option<RateLimiter>, config: &RateLimiterConfig, dir: &str| match kept
        {
            Some(limiter) => Ok(Some(limiter)),
            None => new_limiter(config)
                .map_err(|e| ActivateError::Other(format!("virtio-net {dir} rate limiter: {e}"))),
        };
        let rx_limiter = limiter(self.rx_limiter.take(), &self.rate_limits.0, "rx");
        let tx_limiter = limiter(self.tx_limiter.take(), &self.rate_limits.1, "tx");
        let (rx_limiter, tx_limiter) = match (rx_limiter, tx_limiter) {
            (Ok(rx), Ok(tx)) => (rx, tx),
            (Err(e), _) | (_, Err(e)) => {
                self.backend = Some(backend);
                return Err(e);
            }
        };
        let handler = NetHandler::new(backend, rx_limiter, tx_limiter);
        match Worker::spawn("net", handler, activation) {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err(e) => {
                let NetHandler {
                    backend,
                    rx_limiter,
                    tx_limiter,
                    ..
                } = e.handler;
                self.backend = Some(backend);
                self.rx_limiter = rx_limiter;
                self.tx_limiter = tx_limiter;
                Err(ActivateError::Start(e.source))
            }
        }
    }
}

struct NetHandler {
    backend: Box<dyn NetBackend>,
    rx_buffer: FrameBuffer,
    tx_buffer: FrameBuffer,
    /// Whether the worker polls the backend fd.
    watching: bool,
    last_stop: RxStop,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    /// Where the backend's fd and the limiters' timers are in
    /// [`backend_fds`](QueueHandler::backend_fds), in that order.
    tap_slot: Option<usize>,
    rx_timer_slot: Option<usize>,
    tx_timer_slot: Option<usize>,
}

impl NetHandler {
    fn new(
        backend: Box<dyn NetBackend>,
        rx_limiter: Option<RateLimiter>,
        tx_limiter: Option<RateLimiter>,
    ) -> Self {
        let mut slots = 0..;
        let mut slot = |present: bool| present.then(|| slots.next()).flatten();
        let tap_slot = slot(backend.rx_fd().is_some());
        let rx_timer_slot = slot(rx_limiter.is_some());
        let tx_timer_slot = slot(tx_limiter.is_some());
        NetHandler {
            backend,
            rx_buffer: FrameBuffer::new(),
            tx_buffer: FrameBuffer::new(),
            watching: true,
            last_stop: RxStop::BackendEmpty,
            rx_limiter,
            tx_limiter,
            tap_slot,
            rx_timer_slot,
            tx_timer_slot,
        }
    }

    fn rx<M: GuestAddressSpace>(&mut self, ctx: &mut WorkerContext<M>) {
        let mem = ctx.memory();
        // One frame at a time, so that a stop request (a reset or a pause) waits for
        // the frame in flight, not for a whole budget of them.
        let stop = ctx.stop_flag();
        let Some(queue) = ctx.queue_mut(RX_QUEUE) else {
            return;
        };
        let mut report = RxReport {
            stop: RxStop::Budget,
            ..RxReport::default()
        };
        for _ in 0..RX_BUDGET {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let one = match &mut self.rx_limiter {
                None => process_rx(&*mem, queue, &mut *self.backend, &mut self.rx_buffer, 1),
                Some(limiter) => process_rx(
                    &*mem,
                    queue,
                    &mut LimitedRx {
                        backend: &mut *self.backend,
                        limiter,
                    },
                    &mut self.rx_buffer,
                    1,
                ),
            };
            report.used += one.used;
            if one.stop != RxStop::Budget {
                report.stop = one.stop;
                break;
            }
        }
        self.last_stop = report.stop;
        if report.used > 0 {
            ctx.signal_used(&mem, RX_QUEUE);
        }
        // A blocked rx limiter: leave frames in the tap until its timer fires.
        let blocked = self
            .rx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked);
        let watch = !blocked && !matches!(report.stop, RxStop::NoBuffers | RxStop::BackendError);
        if let Some(slot) = self.tap_slot {
            if watch != self.watching {
                ctx.watch_backend(slot, watch);
                self.watching = watch;
            }
        } else if report.stop == RxStop::Budget {
            ctx.kick(RX_QUEUE);
        }
    }

    fn tx<M: GuestAddressSpace>(&mut self, ctx: &mut WorkerContext<M>) {
        let backend = &mut *self.backend;
        let buffer = &mut self.tx_buffer;
        let Some(limiter) = &mut self.tx_limiter else {
            ctx.process_queue(TX_QUEUE, QUEUE_BUDGET, |mem, chain| {
                process_tx_chain(mem, chain, backend, buffer);
                0
            });
            return;
        };
        serve_limited(ctx, TX_QUEUE, limiter, |mem, chain| {
            process_tx_chain(mem, chain, backend, buffer);
            // The frame's length as the guest gave it, sent or dropped (capped).
            (0, buffer.layout.readable_len.min(MAX_FRAME_LEN as u64))
        });
    }
}

impl<M: GuestAddressSpace> QueueHandler<M> for NetHandler {
    fn backend_fds(&self) -> Vec<RawFd> {
        let rx_timer = self.rx_limiter.as_ref().map(AsRawFd::as_raw_fd);
        let tx_timer = self.tx_limiter.as_ref().map(AsRawFd::as_raw_fd);
        // In slot order: the tap, then the timers.
        [self.backend.rx_fd(), rx_timer, tx_timer]
            .into_iter()
            .flatten()
            .collect()
    }

    fn queue_notified(&mut self, ctx: &mut WorkerContext<M>, queue: usize) {
        match queue {
            RX_QUEUE => self.rx(ctx),
            TX_QUEUE => {
                self.tx(ctx);
                // A backend error paused rx; try again now that something happened.
                if self.last_stop == RxStop::BackendError {
                    self.rx(ctx);
                }
            }
            _ => {}
        }
    }

    fn backend_ready(&mut self, ctx: &mut WorkerContext<M>, index: usize) {
        let index = Some(index);
        if index == self.rx_timer_slot {
            if let Some(limiter) = &mut self.rx_limiter {
                handle_timer(limiter, "virtio-net rx");
            }
            self.rx(ctx);
        } else if index == self.tx_timer_slot {
            if let Some(limiter) = &mut self.tx_limiter {
                handle_timer(limiter, "virtio-net tx");
            }
            self.tx(ctx);
        } else {
            self.rx(ctx);
        }
    }
}

#[cfg(test)]
mod tests;
