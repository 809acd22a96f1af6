//! virtio-rng (virtio 1.2, section 5.4): an entropy source backed by `getrandom(2)`.
//!
//! One queue. Each chain's device-writable buffers are filled with random bytes, at most
//! [`MAX_BYTES_PER_CHAIN`] per chain; device-readable buffers are ignored, so a chain with
//! no writable buffer completes with used length 0.

use std::io;

use ember_virtio::{
    device_type, ActivateDevice, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use log::warn;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use crate::QUEUE_MAX_SIZE;
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
                warn!("virtio-rng: getrandom failed: {e}");
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
/// `RING_EVENT_IDX`, `RING_INDIRECT_DESC`; no configuration space.
#[derive(Debug, Default)]
pub struct Rng {
    worker: Option<Worker<RngHandler>>,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Rng {
        Rng::default()
    }
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
            worker.stop();
        }
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
        self.worker = Some(Worker::spawn("rng", RngHandler, activation)?);
        Ok(())
    }
}

struct RngHandler;

impl<M: GuestAddressSpace> QueueHandler<M> for RngHandler {
    fn queue_notified(&mut self, ctx: &mut WorkerContext<M>, queue: usize) {
        ctx.process_queue(queue, QUEUE_BUDGET, |mem, chain| {
            process_request(mem, chain)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use ember_virtio::{ActiveQueue, InterruptKind};
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
        })
        .unwrap();
        rng.reset();
    }
}
