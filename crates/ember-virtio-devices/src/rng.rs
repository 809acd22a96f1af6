//! virtio-rng (virtio 1.2, section 5.4): an entropy source backed by `getrandom(2)`.
//!
//! One queue. Each chain's device-writable buffers are filled with random bytes, at most
//! [`MAX_BYTES_PER_CHAIN`] per chain; device-readable buffers are ignored, so a chain with
//! no writable buffer completes with used length 0.
//!
//! **Rate limiting** ([`Rng::with_rate_limiter`]): each chain costs one token of the
//! operations bucket and its random bytes from the bandwidth bucket, charged when the
//! chain is done (what a bucket lacks becomes a debt). While the limiter is blocked the
//! worker takes no chain, leaves the rest in the ring, and waits for the limiter's
//! timer among its backend fds; so a guest gets at most one chain beyond the limit, and
//! then waits for it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use ember_rate_limiter::{
    error_limited, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState,
};
use ember_virtio::{
    device_type, ActivateDevice, ActivateError, Activation, ActiveQueue, PauseError, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use crate::limited::{handle_timer, serve_limited};
use crate::{VirtioDeviceError, QUEUE_MAX_SIZE};
use ember_virtio::worker::{QueueHandler, Worker, WorkerContext, QUEUE_BUDGET};

/// At most this many random bytes go into one chain (64 KiB).
pub const MAX_BYTES_PER_CHAIN: usize = 64 * 1024;

/// Fills `buf` from `getrandom(2)` (the urandom source; blocks only until the kernel's
/// pool is first initialised).
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // 0 <= ret <= rest.len().
        done += ret as usize;
    }
    Ok(())
}

/// Fills the device-writable buffers of one chain with random bytes (at most
/// [`MAX_BYTES_PER_CHAIN`]) and returns the used length: the bytes written, which always
/// form a prefix of the writable buffers (filling stops at the first buffer outside
/// guest memory or on a `getrandom` failure).
pub fn process_request<M, I>(mem: &M, chain: I) -> u32
where
    M: GuestMemory + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut chunk = [0u8; 4096];
    let mut written = 0usize;
    'descs: for desc in chain {
        if !desc.is_write_only() {
            continue;
        }
        if written >= MAX_BYTES_PER_CHAIN {
            break;
        }
        let want = (desc.len() as usize).min(MAX_BYTES_PER_CHAIN - written);
        let mut off = 0usize;
        while off < want {
            let n = (want - off).min(chunk.len());
            let Some(addr) = desc.addr().0.checked_add(off as u64) else {
                break 'descs;
            };
            if let Err(e) = fill_random(&mut chunk[..n]) {
                error_limited!("virtio-rng: getrandom failed: {e}");
                break 'descs;
            }
            if mem.write_slice(&chunk[..n], GuestAddress(addr)).is_err() {
                break 'descs;
            }
            off += n;
            written += n;
        }
    }
    // written <= 64 KiB.
    written as u32
}

/// A virtio-rng device.
///
/// One queue of up to [`QUEUE_MAX_SIZE`] entries; features `VERSION_1`,
/// `RING_EVENT_IDX`, `RING_INDIRECT_DESC`; no configuration space. Optionally
/// rate-limited ([`Rng::with_rate_limiter`]).
#[derive(Debug, Default)]
pub struct Rng {
    worker: Option<Worker<RngHandler>>,
    /// The limits given to [`Rng::with_rate_limiter`].
    rate_limit: RateLimiterConfig,
    /// The limiter while the device is inactive; the worker has it while active. It
    /// survives resets, so a guest cannot refill its buckets by resetting the device.
    limiter: Option<RateLimiter>,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Rng {
        Rng::default()
    }

    /// Limits the device to `config`: each chain takes one token from the operations
    /// bucket and its random bytes from the bandwidth bucket (see the
    /// [module documentation](self)). A config with no bucket removes the limit. Errors
    /// name the bad value ([`VirtioDeviceError::RateLimiter`]).
    ///
    /// ```
    /// use ember_virtio_devices::Rng;
    /// use ember_rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    ///
    /// // 1 MiB/s of entropy, at most 1000 requests a second.
    /// let rng = Rng::new().with_rate_limiter(RateLimiterConfig {
    ///     bandwidth: Some(TokenBucketConfig { size: 1 << 20, one_time_burst: 0, refill_time_ms: 1000 }),
    ///     ops: Some(TokenBucketConfig { size: 1000, one_time_burst: 0, refill_time_ms: 1000 }),
    /// })?;
    /// assert!(!rng.rate_limit().is_unlimited());
    ///
    /// let bad = RateLimiterConfig {
    ///     bandwidth: Some(TokenBucketConfig { size: 0, one_time_burst: 0, refill_time_ms: 1000 }),
    ///     ops: None,
    /// };
    /// assert!(Rng::new().with_rate_limiter(bad).is_err());
    /// # Ok::<(), ember_virtio_devices::VirtioDeviceError>(())
    /// ```
    pub fn with_rate_limiter(
        mut self,
        config: RateLimiterConfig,
    ) -> Result<Rng, VirtioDeviceError> {
        self.limiter = new_limiter(&config).map_err(|source| VirtioDeviceError::RateLimiter {
            device: "virtio-rng".into(),
            source,
        })?;
        self.rate_limit = config;
        Ok(self)
    }

    /// The limits set with [`Rng::with_rate_limiter`] (no bucket: unlimited).
    pub fn rate_limit(&self) -> RateLimiterConfig {
        self.rate_limit
    }
}

/// A limiter for `config`, or none when it limits nothing.
fn new_limiter(config: &RateLimiterConfig) -> Result<Option<RateLimiter>, RateLimiterError> {
    if config.is_unlimited() {
        return Ok(None);
    }
    RateLimiter::new(config).map(Some)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            if let Some(handler) = worker.stop() {
                self.limiter = handler.limiter;
            }
        }
    }

    fn save_rate_limiters(&mut self) -> Vec<RateLimiterState> {
        crate::limited::save_limiters([self.limiter.as_mut()])
    }

    fn restore_rate_limiters(
        &mut self,
        states: &[RateLimiterState],
    ) -> Result<(), RateLimiterError> {
        crate::limited::restore_limiters([self.limiter.as_mut()], states)
    }

    /// Stops the worker after the chain in flight and gives back the queue; the rate
    /// limiter, buckets and debts included, stays with the device for the next
    /// activation.
    fn pause(&mut self) -> Result<Vec<ActiveQueue>, PauseError> {
        let Some(worker) = self.worker.take() else {
            return Err(PauseError::NotRunning {
                device_type: device_type::RNG,
            });
        };
        // A worker that panicked took the limiter: `activate` builds a new one.
        let (handler, queues) = worker.stop_keeping_queues().ok_or(PauseError::WorkerLost {
            device_type: device_type::RNG,
        })?;
        self.limiter = handler.limiter;
        Ok(queues)
    }
}

impl<M: GuestAddressSpace + Send + 'static> ActivateDevice<M> for Rng {
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Other("virtio-rng is already active".into()));
        }
        if activation.queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: activation.queues.len(),
            });
        }
        let limiter = match self.limiter.take() {
            Some(limiter) => Some(limiter),
            // Lost with a worker that panicked: start again from the settings.
            None => new_limiter(&self.rate_limit)
                .map_err(|e| ActivateError::Other(format!("virtio-rng: rate limiter: {e}")))?,
        };
        match Worker::spawn("rng", RngHandler { limiter }, activation) {
            Ok(worker) => {
                self.worker = Some(worker);
                Ok(())
            }
            Err(e) => {
                self.limiter = e.handler.limiter;
                Err(ActivateError::Start(e.source))
            }
        }
    }
}

struct RngHandler {
    limiter: Option<RateLimiter>,
}

impl RngHandler {
    fn serve<M: GuestAddressSpace>(&mut self, ctx: &mut WorkerContext<M>, queue: usize) {
        let Some(limiter) = &mut self.limiter else {
            ctx.process_queue(queue, QUEUE_BUDGET, |mem, chain| {
                process_request(mem, chain)
            });
            return;
        };
        serve_limited(ctx, queue, limiter, |mem, chain| {
            let len = process_request(mem, chain);
            (len, u64::from(len))
        });
    }
}

impl<M: GuestAddressSpace> QueueHandler<M> for RngHandler {
    fn backend_fds(&self) -> Vec<RawFd> {
        self.limiter.iter().map(AsRawFd::as_raw_fd).collect()
    }

    fn queue_notified(&mut self, ctx: &mut WorkerContext<M>, queue: usize) {
        self.serve(ctx, queue);
    }

    fn backend_ready(&mut self, ctx: &mut WorkerContext<M>, _index: usize) {
        if let Some(limiter) = &mut self.limiter {
            handle_timer(limiter, "virtio-rng");
        }
        self.serve(ctx, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use ember_virtio::InterruptKind;
    use virtio_queue::QueueT;

    fn pop_and_process(mem: &vm_memory::GuestMemoryMmap, q: &mut virtio_queue::Queue) -> u32 {
        let chain = q.pop_descriptor_chain(mem).unwrap();
        process_request(mem, chain)
    }

    #[test]
    fn fills_writable_buffers() {
        let m = mem();
        let mut d = Driver::new(&m, 0, 16);
        d.add(&[
            (DATA, 100, false),
            (DATA + 0x1000, 300, true),
            (DATA + 0x2000, 200, true),
        ]);
        let mut q = d.queue();
        assert_eq!(pop_and_process(&m, &mut q), 500);
        // Readable buffer untouched; 500 random bytes are not all zero.
        assert!(read(&m, DATA, 100).iter().all(|&b| b == 0));
        assert!(read(&m, DATA + 0x1000, 300).iter().any(|&b| b != 0));
        assert!(read(&m, DATA + 0x2000, 200).iter().any(|&b| b != 0));
        assert!(read(&m, DATA + 0x2000 + 200, 64).iter().all(|&b| b == 0));
    }

    #[test]
    fn caps_each_chain_at_64k() {
        let m = mem();
        let mut d = Driver::new(&m, 0, 16);
        d.add(&[(DATA, 0x30000, true), (DATA + 0x30000, 0x30000, true)]);
        let mut q = d.queue();
        assert_eq!(pop_and_process(&m, &mut q), MAX_BYTES_PER_CHAIN as u32);
        // Nothing past the cap.
        assert!(read(&m, DATA + 0x10000, 0x1000).iter().all(|&b| b == 0));
    }

    #[test]
    fn readable_only_and_bad_chains_get_zero() {
        let m = mem();
        let mut d = Driver::new(&m, 0, 16);
        d.add(&[(DATA, 100, false)]);
        d.add(&[(MEM_SIZE - 16, 64, true)]);
        d.add(&[(u64::MAX - 8, u32::MAX, true)]);
        d.add(&[(DATA, 0, true)]);
        let mut q = d.queue();
        for _ in 0..4 {
            assert_eq!(pop_and_process(&m, &mut q), 0);
        }
        // Partly out of bounds after a good buffer: only the good prefix counts.
        d.add(&[(DATA, 10, true), (MEM_SIZE - 4, 8, true)]);
        assert_eq!(pop_and_process(&m, &mut q), 10);
    }

    #[test]
    fn worker_serves_the_queue() {
        let m = mem();
        let mut d = Driver::new(&m, 0, 256);
        let (aq, kick) = active_queue(0, &d);
        let irq = RecordingInterrupt::new();
        let mut rng = Rng::new();
        assert_eq!(rng.device_type(), device_type::RNG);
        assert_eq!(rng.queue_max_sizes(), &[256]);
        rng.activate(Activation {
            mem: std::sync::Arc::new(m.clone()),
            queues: vec![aq],
            interrupt: irq.clone(),
            features: rng.device_features(),
            thread_hook: None,
            spawner: None,
        })
        .unwrap();
        d.add(&[(DATA, 32, true)]);
        kick.write(1).unwrap();
        assert!(d.wait_used(1), "the worker did not use the chain");
        assert_eq!(d.used(0).1, 32);
        assert!(irq.wait_for(InterruptKind::Queue(0)));
        rng.reset();
        // A second activation works after reset.
        let d2 = Driver::new(&m, 0x8000, 16);
        let (aq2, _kick2): (ActiveQueue, _) = active_queue(0, &d2);
        rng.activate(Activation {
            mem: std::sync::Arc::new(m.clone()),
            queues: vec![aq2],
            interrupt: irq,
            features: 0,
            thread_hook: None,
            spawner: None,
        })
        .unwrap();
        rng.reset();
    }

    fn limited(bytes: u64, refill_time_ms: u64) -> Rng {
        Rng::new()
            .with_rate_limiter(RateLimiterConfig {
                bandwidth: Some(ember_rate_limiter::TokenBucketConfig {
                    size: bytes,
                    one_time_burst: 0,
                    refill_time_ms,
                }),
                ops: None,
            })
            .unwrap()
    }

    fn activation(
        m: &vm_memory::GuestMemoryMmap,
        aq: ActiveQueue,
    ) -> Activation<std::sync::Arc<vm_memory::GuestMemoryMmap>> {
        Activation {
            mem: std::sync::Arc::new(m.clone()),
            queues: vec![aq],
            interrupt: RecordingInterrupt::new(),
            features: 0,
            thread_hook: None,
            spawner: None,
        }
    }

    #[test]
    fn invalid_limits_are_rejected() {
        let err = Rng::new()
            .with_rate_limiter(RateLimiterConfig {
                bandwidth: None,
                ops: Some(ember_rate_limiter::TokenBucketConfig {
                    size: 10,
                    one_time_burst: 0,
                    refill_time_ms: 0,
                }),
            })
            .unwrap_err();
        let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            msg.contains("virtio-rng") && msg.contains("refill"),
            "{msg}"
        );
        assert!(Rng::new()
            .with_rate_limiter(RateLimiterConfig::default())
            .unwrap()
            .rate_limit()
            .is_unlimited());
    }

    /// A limit of 1000 bytes an hour: chains of 300 bytes get through until the bucket
    /// is short (the fourth goes into debt), then the rest stay in the ring, also across
    /// a reset (a reset does not refill the bucket).
    #[test]
    fn a_blocked_limiter_leaves_chains_in_the_ring() {
        let m = mem();
        let mut d = Driver::new(&m, 0, 16);
        for i in 0..6 {
            d.add(&[(DATA + i * 0x1000, 300, true)]);
        }
        let (aq, _kick) = active_queue(0, &d);
        let mut rng = limited(1000, 3_600_000);
        rng.activate(activation(&m, aq)).unwrap();
        assert!(d.wait_used(4), "the worker did not serve the first chains");
        // Anything more would come within the hour; give it time to go wrong.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(d.used_idx(), 4, "the limiter let a fifth chain through");
        assert!(read(&m, DATA + 4 * 0x1000, 300).iter().all(|&b| b == 0));

        rng.reset();
        let d2 = Driver::new(&m, 0x8000, 16);
        let mut d2 = d2;
        d2.add(&[(DATA + 0x10000, 16, true)]);
        let (aq2, _kick2) = active_queue(0, &d2);
        rng.activate(activation(&m, aq2)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(d2.used_idx(), 0, "a reset refilled the bucket");
        rng.reset();
    }

    /// A limit of 1000 bytes per 100 ms: the chains past the bucket are served when the
    /// timer fires, not before.
    #[test]
    fn the_timer_resumes_a_blocked_queue() {
        let m = mem();
        let mut d = Driver::new(&m, 0, 16);
        for i in 0..5 {
            d.add(&[(DATA + i * 0x1000, 400, true)]);
        }
        let (aq, _kick) = active_queue(0, &d);
        let start = std::time::Instant::now();
        let mut rng = limited(1000, 100);
        rng.activate(activation(&m, aq)).unwrap();
        assert!(
            d.wait_used(5),
            "the limiter never let the last chains through"
        );
        // 2000 bytes through a 1000-byte bucket refilled at 10 bytes/ms: the third chain
        // goes 200 bytes into debt, the fourth (after 20 ms) 400 more, so the fifth
        // starts after at least 600 bytes of refill, 60 ms.
        assert!(start.elapsed() >= std::time::Duration::from_millis(60));
        rng.reset();
    }
}
