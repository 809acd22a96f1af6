//! The virtio-mmio transport ([`ember_virtio::MmioTransport`]) under random sequences
//! of register and configuration-space reads and writes of any width (0 to 16 bytes)
//! and offset, with queue set-up at random addresses, driver-OK and resets at any
//! point, notifications, interrupt acknowledgements, and guest-memory writes (rings).
//!
//! Behind the transport is either a mock device (random queue counts and sizes,
//! features, configuration space, failing activations), whose activations are checked,
//! or one of Ember's real devices (rng, net on a scripted backend, blk on a scratch
//! disk), whose worker threads then serve whatever the rings hold.
//!
//! Checked: the identity registers never change; after a reset the status, interrupt
//! status and activation are cleared; a device is activated at most once between
//! resets, only with ready queues that lie in guest memory, in index order; and the
//! transport reports itself active exactly when DRIVER_OK stuck.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ember_bus::BusDevice;
use ember_virtio::mmio::{reg, status, MmioTransport, MMIO_MAGIC_VALUE};
use ember_virtio::{ActivateDevice, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use ember_virtio_devices::{Block, Net, NetBackend, Rng};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::common::{place_chain, poke, virtio_memory, Addr, Chain, Ring};

/// Guest memory as the transport and the devices hold it.
type Mem = Arc<GuestMemoryMmap>;
use crate::{decode, input_struct};

input_struct! {
    /// `device % 8`: 0-4 the mock device, 5 virtio-rng, 6 virtio-net, 7 virtio-blk.
    /// For the mock: `queues` (count and sizes), `features`, `fail` (bit 0: activation
    /// fails). Then the accesses.
    pub struct MmioInput {
        pub device: u8,
        pub queues: [u8; 4],
        pub features: u64,
        pub fail: u8,
        pub ops: Vec<MmioOp>,
    }
}

input_struct! {
    /// One access or driver step; `kind % 16` selects it (see [`run`]).
    pub struct MmioOp {
        pub kind: u8,
        pub offset: u16,
        pub width: u8,
        pub value: u64,
        pub addr: Addr,
        pub chain: Chain,
    }
}

/// What the mock device saw.
#[derive(Default)]
struct MockLog {
    activations: AtomicUsize,
    resets: AtomicUsize,
    active: Mutex<bool>,
}

struct Mock {
    sizes: Vec<u16>,
    features: u64,
    fail: bool,
    config: [u8; 24],
    mem: GuestMemoryMmap,
    log: Arc<MockLog>,
}

impl VirtioDevice for Mock {
    fn device_type(&self) -> u32 {
        42
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = start.checked_add(i).and_then(|j| self.config.get(j)) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, b) in data.iter().enumerate() {
            if let Some(v) = start.checked_add(i).and_then(|j| self.config.get_mut(j)) {
                *v = *b;
            }
        }
    }

    fn reset(&mut self) {
        *self.log.active.lock().unwrap() = false;
        self.log.resets.fetch_add(1, Ordering::Relaxed);
    }
}

impl ActivateDevice<Mem> for Mock {
    fn activate(&mut self, activation: Activation<Mem>) -> Result<(), ActivateError> {
        let mut active = self.log.active.lock().unwrap();
        assert!(!*active, "activated twice without a reset");
        assert!(
            activation.features & !(self.features | VIRTIO_F_VERSION_1) == 0,
            "features {:#x} were not offered ({:#x})",
            activation.features,
            self.features
        );
        let mut last = None;
        for q in &activation.queues {
            assert!(usize::from(q.index) < self.sizes.len(), "queue {}", q.index);
            assert!(last < Some(q.index), "queues out of order");
            last = Some(q.index);
            assert!(q.queue.ready(), "queue {} not ready", q.index);
            assert!(
                q.queue.is_valid(&self.mem),
                "queue {} outside memory",
                q.index
            );
            assert!(q.queue.size() <= self.sizes[usize::from(q.index)]);
        }
        if self.fail {
            return Err(ActivateError::Other("mock failure".into()));
        }
        *active = true;
        self.log.activations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A network backend that swallows frames and has nothing to receive.
struct Quiet;

impl NetBackend for Quiet {
    fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        Ok(frame.len())
    }
}

/// Offsets: `offset >> 14`: 0-1 a register (4-byte aligned, below 0x100), 2 the
/// configuration space, 3 anywhere in (and past) the window.
fn offset_of(raw: u16) -> u64 {
    match raw >> 14 {
        0 | 1 => u64::from(raw % 64) * 4,
        2 => reg::CONFIG + u64::from(raw % 64),
        _ => u64::from(raw & 0x3fff),
    }
}

fn width_of(raw: u8) -> usize {
    match raw % 8 {
        0..=2 => 4,
        3 => 1,
        4 => 2,
        5 => 8,
        6 => 0,
        _ => usize::from(raw / 8 % 17),
    }
}

struct Driver<'a> {
    t: &'a MmioTransport<Mem>,
}

impl Driver<'_> {
    fn read(&self, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        self.t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, the features (`mask` of the offer), FEATURES_OK.
    fn negotiate(&self, mask: u64) {
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.write(reg::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(reg::DEVICE_FEATURES)) << (32 * sel);
        }
        let features = offered & mask;
        for sel in 0..2 {
            self.write(reg::DRIVER_FEATURES_SEL, sel);
            self.write(reg::DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        self.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(&self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.write(reg::QUEUE_SEL, index);
        self.write(reg::QUEUE_NUM, size);
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_DRIVER_LOW, avail),
            (reg::QUEUE_DEVICE_LOW, used),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
    }
}

/// The harness. Operations (`kind % 16`): 0-3 write `width` bytes of `value` at an
/// offset; 4-5 read; 6 write a status value (the usual ones, or `value`); 7 negotiate
/// features; 8 set up queue `value % 4` (default rings, or at `addr`); 9 DRIVER_OK;
/// 10 reset; 11 QueueNotify; 12 InterruptACK; 13 write guest memory or make a chain
/// available; 14 check the transport's view; 15 touch the configuration space.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<MmioInput>(data) else {
        return;
    };
    let mem = virtio_memory();
    let log = Arc::new(MockLog::default());
    let nqueues = usize::from(input.queues[0] % 3) + 1;
    let device: Box<dyn ActivateDevice<Mem>> = match input.device % 8 {
        5 => Box::new(Rng::new()),
        6 => Box::new(Net::with_backend(Box::new(Quiet), Some([2, 0, 0, 0, 0, 1]))),
        7 => Box::new(Block::from_disk(super::virtio_blk::scratch_disk())),
        _ => Box::new(Mock {
            sizes: input.queues[1..=nqueues]
                .iter()
                .map(|s| 1u16 << (s % 16))
                .collect(),
            features: input.features,
            fail: input.fail & 1 != 0,
            config: [0x5a; 24],
            mem: mem.clone(),
            log: Arc::clone(&log),
        }),
    };
    let mock = input.device % 8 < 5;
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let t = match MmioTransport::new(device, Arc::new(mem.clone()), irq) {
        Ok(t) => t,
        Err(_) => return,
    };
    let d = Driver { t: &t };
    let mut rings: Vec<Ring> = (0..4u64).map(|i| Ring::new(64, i * 0x4000)).collect();

    for op in input.ops.iter().take(128) {
        match op.kind % 16 {
            0..=3 => {
                let bytes = op.value.to_le_bytes();
                let mut data = vec![0u8; width_of(op.width)];
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes[i % 8];
                }
                t.write(offset_of(op.offset), &data);
            }
            4 | 5 => {
                let mut data = vec![0xa5u8; width_of(op.width)];
                t.read(offset_of(op.offset), &mut data);
            }
            6 => {
                use status::*;
                let value = match op.value % 8 {
                    0 => 0,
                    1 => ACKNOWLEDGE,
                    2 => ACKNOWLEDGE | DRIVER,
                    3 => ACKNOWLEDGE | DRIVER | FEATURES_OK,
                    4 => ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
                    5 => FAILED | ACKNOWLEDGE,
                    _ => (op.value >> 8) as u32,
                };
                d.write(reg::STATUS, value);
            }
            7 => d.negotiate(op.value | VIRTIO_F_VERSION_1),
            8 => {
                let index = (op.value % 4) as u32;
                let size = 1u32 << ((op.value >> 8) % 10);
                if op.value & (1 << 16) == 0 {
                    let r = &rings[index as usize];
                    d.setup_queue(index, size, r.desc, r.avail, r.used);
                } else {
                    let a = op.addr.resolve();
                    let b = Addr {
                        kind: op.addr.kind.wrapping_add(1),
                        value: op.addr.value.rotate_left(7),
                    }
                    .resolve();
                    let c = Addr {
                        kind: op.addr.kind.wrapping_add(2),
                        value: op.addr.value.rotate_left(13),
                    }
                    .resolve();
                    d.setup_queue(index, size, a, b, c);
                }
            }
            9 => {
                let s = d.read(reg::STATUS);
                d.write(reg::STATUS, s | status::DRIVER_OK);
            }
            10 => {
                d.write(reg::STATUS, 0);
                assert_eq!(d.read(reg::STATUS), 0, "status after reset");
                assert_eq!(
                    d.read(reg::INTERRUPT_STATUS),
                    0,
                    "interrupt status after reset"
                );
                assert!(!t.is_activated(), "active after reset");
                if mock {
                    assert!(!*log.active.lock().unwrap(), "device not reset");
                }
            }
            11 => d.write(reg::QUEUE_NOTIFY, (op.value % 5) as u32),
            12 => d.write(reg::INTERRUPT_ACK, op.value as u32),
            13 => {
                if op.value & 1 == 0 {
                    poke(&mem, op.addr.resolve(), &op.value.to_le_bytes());
                } else {
                    let r = &mut rings[(op.value >> 1) as usize % 4];
                    place_chain(&mem, r, &op.chain, &[0; 16]);
                }
            }
            14 => {
                assert_eq!(d.read(reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
                assert_eq!(d.read(reg::VERSION), 2);
                assert_eq!(d.read(reg::DEVICE_ID), t.device_type());
                let s = d.read(reg::STATUS);
                if t.is_activated() {
                    assert!(s & status::DRIVER_OK != 0, "active with status {s:#x}");
                } else {
                    assert!(
                        s & status::DRIVER_OK == 0 || s & status::DEVICE_NEEDS_RESET != 0,
                        "DRIVER_OK without an activation or DEVICE_NEEDS_RESET: {s:#x}"
                    );
                }
                if mock {
                    assert_eq!(t.is_activated(), *log.active.lock().unwrap());
                }
                let _ = t.stats();
                let _ = t.queue_notify_events();
            }
            _ => {
                let offset = reg::CONFIG + u64::from(op.offset % 0x1000);
                let mut data = vec![0u8; width_of(op.width)];
                if op.value & 1 == 0 {
                    t.read(offset, &mut data);
                } else {
                    t.write(offset, &data);
                }
            }
        }
    }
    if mock {
        let activations = log.activations.load(Ordering::Relaxed);
        let resets = log.resets.load(Ordering::Relaxed);
        assert!(
            activations <= resets + 1,
            "{activations} activations, {resets} resets"
        );
    }
    // Dropping the transport stops a real device's worker.
}
