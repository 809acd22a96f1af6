use std::sync::{Arc, Mutex};

use ember_bus::BusDevice;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::status::*;
use super::*;
use crate::device::{ActivateError, VirtioDevice, VIRTIO_RING_F_INDIRECT_DESC};

const MEM_SIZE: usize = 0x10_0000;
const RING_PACKED: u64 = 1 << 34;

/// A queue as the device received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QueueInfo {
    index: u16,
    max_size: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    ready: bool,
}

#[derive(Default)]
struct Log {
    /// Features and queues of every activation.
    activations: Vec<(u64, Vec<QueueInfo>)>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    fail_activate: bool,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    notifies: Vec<EventFd>,
}

/// Records every call; `activate` fails while `fail_activate` is set.
struct MockDevice {
    log: Arc<Mutex<Log>>,
    max_sizes: Vec<u16>,
    features: u64,
    config: [u8; 16],
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        crate::device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(v) = at.and_then(|at| self.config.get(at)) {
                *byte = *v;
            }
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
        for (i, byte) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(v) = at.and_then(|at| self.config.get_mut(at)) {
                *v = *byte;
            }
        }
    }
    fn config_generation(&self) -> u32 {
        7
    }
    fn reset(&mut self) {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.interrupt = None;
        log.notifies.clear();
    }
}

impl<M: GuestAddressSpace> ActivateDevice<M> for MockDevice {
    fn activate(&mut self, activation: Activation<M>) -> Result<(), ActivateError> {
        let mut log = self.log.lock().unwrap();
        if log.fail_activate {
            return Err(ActivateError::Other("told to fail".into()));
        }
        let queues = activation
            .queues
            .iter()
            .map(|q| QueueInfo {
                index: q.index,
                max_size: q.queue.max_size(),
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                event_idx: q.queue.event_idx_enabled(),
                ready: q.queue.ready(),
            })
            .collect();
        log.activations.push((activation.features, queues));
        log.interrupt = Some(activation.interrupt);
        log.notifies = activation.queues.into_iter().map(|q| q.notify).collect();
        Ok(())
    }
}

/// Guest memory as the tests hold it.
type Mem = Arc<GuestMemoryMmap>;

struct Harness {
    t: MmioTransport<Mem>,
    log: Arc<Mutex<Log>>,
    irq: EventFd,
    mem: Mem,
}

const DEVICE_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC | 1;

fn memory() -> Mem {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

fn harness_with(max_sizes: &[u16], features: u64) -> Harness {
    let log = Arc::new(Mutex::new(Log::default()));
    let mut config = [0u8; 16];
    for (i, b) in config.iter_mut().enumerate() {
        *b = 0xa0 + i as u8;
    }
    let device = MockDevice {
        log: log.clone(),
        max_sizes: max_sizes.to_vec(),
        features,
        config,
    };
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mem = memory();
    let t = MmioTransport::new(Box::new(device), mem.clone(), irq.try_clone().unwrap()).unwrap();
    Harness { t, log, irq, mem }
}

fn harness() -> Harness {
    harness_with(&[16, 64], DEVICE_FEATURES)
}

impl Harness {
    fn r(&self, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        self.t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn w(&self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    fn status(&self) -> u32 {
        self.r(reg::STATUS)
    }

    fn write_features(&self, features: u64) {
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, features as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether FEATURES_OK stuck.
    fn to_features_ok(&self, features: u64) -> bool {
        self.w(reg::STATUS, ACKNOWLEDGE);
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
        self.write_features(features);
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.status() & FEATURES_OK != 0
    }

    fn setup_queue(&self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.w(reg::QUEUE_SEL, index);
        self.w(reg::QUEUE_NUM, size);
        self.w(reg::QUEUE_DESC_LOW, desc as u32);
        self.w(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.w(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w(reg::QUEUE_DEVICE_LOW, used as u32);
        self.w(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.w(reg::QUEUE_READY, 1);
    }

    /// Lays out queue `index` with `MockSplitQueue` at `start` and sets it up.
    fn setup_mock_queue(&self, index: u32, size: u16, start: u64) -> (u64, u64, u64) {
        let q = MockSplitQueue::create(&*self.mem, GuestAddress(start), size);
        let addrs = (q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0);
        self.setup_queue(index, u32::from(size), addrs.0, addrs.1, addrs.2);
        addrs
    }

    fn driver_ok(&self) {
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Full initialisation of both queues; returns their layouts.
    fn activate_all(&self, features: u64) -> [(u64, u64, u64); 2] {
        assert!(self.to_features_ok(features));
        let q0 = self.setup_mock_queue(0, 16, 0x1000);
        let q1 = self.setup_mock_queue(1, 64, 0x8000);
        self.driver_ok();
        [q0, q1]
    }

    fn regs(&self) -> Registers {
        self.t.lock().regs.clone()
    }

    fn activations(&self) -> usize {
        self.log.lock().unwrap().activations.len()
    }

    fn resets(&self) -> usize {
        self.log.lock().unwrap().resets
    }

    /// Reads and clears the irq eventfd's counter (0 if it was not written).
    fn irq_count(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}

/// A small deterministic generator, no dependency needed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn transport_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<MmioTransport<Mem>>();
    check::<MmioTransport<Arc<GuestMemoryMmap<AtomicBitmap>>>>();
    check::<MmioTransport<GuestMemoryAtomic<GuestMemoryMmap<AtomicBitmap>>>>();
}

#[test]
fn constructor_rejects_bad_queue_layouts() {
    let make = |sizes: &[u16]| {
        let device = MockDevice {
            log: Arc::default(),
            max_sizes: sizes.to_vec(),
            features: 0,
            config: [0; 16],
        };
        MmioTransport::new(
            Box::new(device),
            memory(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
    };
    assert!(matches!(make(&[]), Err(TransportError::NoQueues)));
    for bad in [0, 3, 100, 65535] {
        assert!(matches!(
            make(&[256, bad]),
            Err(TransportError::InvalidQueueMaxSize { index: 1, size }) if size == bad
        ));
    }
    let t = make(&[1, 32768]).unwrap();
    assert_eq!(t.device_type(), crate::device_type::BLOCK);
    assert!(!t.is_activated());
    assert_eq!(t.stats(), TransportStats::default());
    assert!(format!("{t:?}").contains("MmioTransport"));
}

#[test]
fn identity_registers() {
    let h = harness();
    assert_eq!(h.r(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.r(reg::VERSION), 2);
    assert_eq!(h.r(reg::DEVICE_ID), crate::device_type::BLOCK);
    assert_eq!(h.r(reg::VENDOR_ID), 0x5242_4d45);
    assert_eq!(&h.r(reg::VENDOR_ID).to_le_bytes(), b"EMBR");
    assert_eq!(h.r(reg::STATUS), 0);
    assert_eq!(h.r(reg::INTERRUPT_STATUS), 0);
    assert_eq!(h.r(reg::CONFIG_GENERATION), 7);
    assert_eq!(h.r(reg::QUEUE_RESET), 0);
    // No shared memory regions: length -1 whatever SHMSel says.
    for sel in [0, 1, u32::MAX] {
        h.w(reg::SHM_SEL, sel);
        assert_eq!(h.r(reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(h.r(reg::SHM_LEN_HIGH), u32::MAX);
        assert_eq!(h.r(reg::SHM_BASE_LOW), 0);
        assert_eq!(h.r(reg::SHM_BASE_HIGH), 0);
    }
    // QueueNumMax per queue, 0 for queues that do not exist.
    for (sel, max) in [(0, 16), (1, 64), (2, 0), (0xffff, 0), (u32::MAX, 0)] {
        h.w(reg::QUEUE_SEL, sel);
        assert_eq!(h.r(reg::QUEUE_NUM_MAX), max, "queue {sel}");
        assert_eq!(h.r(reg::QUEUE_READY), 0);
    }
    assert_eq!(h.t.stats(), TransportStats::default());
}

#[test]
fn device_feature_windows() {
    let h = harness_with(&[16], DEVICE_FEATURES | RING_PACKED | (1 << 40));
    // VERSION_1 is always offered; packed rings and ring reset never are.
    let expected = DEVICE_FEATURES;
    assert_eq!(h.t.offered_features(), expected);
    h.w(reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(h.r(reg::DEVICE_FEATURES), expected as u32);
    h.w(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(h.r(reg::DEVICE_FEATURES), (expected >> 32) as u32);
    for sel in [2, 3, u32::MAX] {
        h.w(reg::DEVICE_FEATURES_SEL, sel);
        assert_eq!(h.r(reg::DEVICE_FEATURES), 0);
    }

    // A device that forgets VERSION_1 still gets it offered.
    let h = harness_with(&[16], 1 << 5);
    assert_eq!(h.t.offered_features(), VIRTIO_F_VERSION_1 | (1 << 5));
    h.w(reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(h.r(reg::DEVICE_FEATURES), 1);
}

#[test]
fn driver_feature_windows() {
    let h = harness();
    // Before DRIVER: ignored.
    h.write_features(DEVICE_FEATURES);
    assert_eq!(h.regs().driver_features, 0);
    assert_eq!(h.t.stats().refused_writes, 2);

    h.w(reg::STATUS, ACKNOWLEDGE);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
    h.w(reg::DRIVER_FEATURES_SEL, 0);
    h.w(reg::DRIVER_FEATURES, 0x1234_5678);
    h.w(reg::DRIVER_FEATURES_SEL, 1);
    h.w(reg::DRIVER_FEATURES, 0x9abc_def0);
    assert_eq!(h.regs().driver_features, 0x9abc_def0_1234_5678);
    // Rewriting one window leaves the other alone.
    h.w(reg::DRIVER_FEATURES_SEL, 0);
    h.w(reg::DRIVER_FEATURES, 0x1111_1111);
    assert_eq!(h.regs().driver_features, 0x9abc_def0_1111_1111);
    // Windows above 1 do not exist.
    h.w(reg::DRIVER_FEATURES_SEL, 2);
    h.w(reg::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(h.regs().driver_features, 0x9abc_def0_1111_1111);
    // DriverFeatures is write-only.
    let unknown = h.t.stats().unknown_registers;
    assert_eq!(h.r(reg::DRIVER_FEATURES), 0);
    assert_eq!(h.t.stats().unknown_registers, unknown + 1);

    // After FEATURES_OK the features are frozen.
    h.write_features(VIRTIO_F_VERSION_1 | 1);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(h.status() & FEATURES_OK, FEATURES_OK);
    h.write_features(DEVICE_FEATURES);
    assert_eq!(h.regs().driver_features, VIRTIO_F_VERSION_1 | 1);
}

#[test]
fn features_ok_needs_version_1() {
    let h = harness();
    assert!(!h.to_features_ok(VIRTIO_RING_F_EVENT_IDX | 1));
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
    assert_eq!(h.t.stats().features_refused, 1);
    // The driver may try again with acceptable features.
    h.write_features(VIRTIO_F_VERSION_1 | 1);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

#[test]
fn features_ok_needs_a_subset_of_the_offer() {
    for extra in [1 << 2, 1 << 31, RING_PACKED, 1 << 40, 1 << 63] {
        let h = harness_with(&[16], DEVICE_FEATURES | RING_PACKED | (1 << 40));
        assert!(!h.to_features_ok(VIRTIO_F_VERSION_1 | extra), "{extra:#x}");
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
        assert_eq!(h.t.stats().features_refused, 1);
        // DRIVER_OK cannot follow a refused FEATURES_OK.
        h.driver_ok();
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
        assert_eq!(h.activations(), 0);
    }
    let h = harness();
    assert!(h.to_features_ok(DEVICE_FEATURES));
    assert_eq!(h.t.stats().features_refused, 0);
}

#[test]
fn status_bits_only_in_order() {
    let h = harness();
    // DRIVER without ACKNOWLEDGE, FEATURES_OK without DRIVER, DRIVER_OK without
    // FEATURES_OK: all ignored.
    for value in [
        DRIVER,
        ACKNOWLEDGE | FEATURES_OK,
        DRIVER_OK,
        ACKNOWLEDGE | DRIVER_OK,
    ] {
        h.w(reg::STATUS, value);
        assert_eq!(h.status(), 0, "{value:#x}");
    }
    // Several bits at once, in order, are fine.
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
    // Clearing bits, DEVICE_NEEDS_RESET from the driver, undefined bits: ignored.
    for value in [
        ACKNOWLEDGE,
        DRIVER,
        ACKNOWLEDGE | DRIVER | DEVICE_NEEDS_RESET,
        0x13,
        0x23,
        0x103,
    ] {
        h.w(reg::STATUS, value);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER, "{value:#x}");
    }
    // Rewriting the same value is harmless.
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
    h.write_features(VIRTIO_F_VERSION_1);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(h.activations(), 1);
}

#[test]
fn failed_is_accepted_any_time_and_stops_progress() {
    let h = harness();
    h.w(reg::STATUS, FAILED);
    assert_eq!(h.status(), FAILED);

    let h = harness();
    h.w(reg::STATUS, ACKNOWLEDGE);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
    h.write_features(VIRTIO_F_VERSION_1);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FAILED);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FAILED);

    let h = harness();
    assert!(h.to_features_ok(VIRTIO_F_VERSION_1));
    h.setup_mock_queue(0, 16, 0x1000);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED);
    h.w(
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED | DRIVER_OK,
    );
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED);
    assert_eq!(h.activations(), 0);

    // After activation too.
    let h = harness();
    h.activate_all(VIRTIO_F_VERSION_1);
    h.w(
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED,
    );
    assert_eq!(h.status() & FAILED, FAILED);
    assert!(h.t.is_activated());
}

#[test]
fn driver_ok_activates_once_with_the_queues() {
    let h = harness();
    let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    let [q0, q1] = h.activate_all(features);
    assert!(h.t.is_activated());
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    {
        let log = h.log.lock().unwrap();
        assert_eq!(log.activations.len(), 1);
        let (got_features, queues) = &log.activations[0];
        assert_eq!(*got_features, features);
        let info = |index, max_size, size, (desc, avail, used)| QueueInfo {
            index,
            max_size,
            size,
            desc,
            avail,
            used,
            event_idx: true,
            ready: true,
        };
        assert_eq!(*queues, vec![info(0, 16, 16, q0), info(1, 64, 64, q1)]);
    }
    // DRIVER_OK again, or more bits: no second activation.
    h.driver_ok();
    h.w(
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED,
    );
    assert_eq!(h.activations(), 1);
    assert_eq!(h.t.stats().activation_failures, 0);
}

#[test]
fn only_ready_queues_without_event_idx() {
    let h = harness();
    assert!(h.to_features_ok(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC));
    // Queue 0 is configured but not enabled; queue 1 uses a smaller size than its max.
    h.w(reg::QUEUE_SEL, 0);
    h.w(reg::QUEUE_NUM, 8);
    let (desc, avail, used) = h.setup_mock_queue(1, 32, 0x4_0000);
    h.driver_ok();
    let log = h.log.lock().unwrap();
    let (features, queues) = &log.activations[0];
    assert_eq!(*features, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC);
    assert_eq!(
        *queues,
        vec![QueueInfo {
            index: 1,
            max_size: 64,
            size: 32,
            desc,
            avail,
            used,
            event_idx: false,
            ready: true,
        }]
    );
}

#[test]
fn queue_addresses_above_4g() {
    let h = harness();
    assert!(h.to_features_ok(VIRTIO_F_VERSION_1));
    h.setup_queue(0, 16, 0x1_0000_1000, 0x2_0000_2000, 0x3_0000_3000);
    let q = &h.regs().queues[0];
    assert_eq!(
        (q.desc.value, q.driver.value, q.device.value),
        (0x1_0000_1000, 0x2_0000_2000, 0x3_0000_3000)
    );
    assert!(q.ready);
}

fn assert_needs_reset_without_activation(h: &Harness) {
    assert_eq!(
        h.status(),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET
    );
    assert!(!h.t.is_activated());
    assert_eq!(h.r(reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(h.irq_count(), 1);
    assert_eq!(h.t.stats().activation_failures, 1);
    // No second attempt, whatever the driver writes.
    h.driver_ok();
    h.w(
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET,
    );
    assert_eq!(h.t.stats().activation_failures, 1);
    assert!(!h.t.is_activated());
}

#[test]
fn queues_outside_memory_need_reset() {
    let end = MEM_SIZE as u64;
    let cases = [
        (end, 0x2000, 0x3000),
        (0x1000, end - 2, 0x3000),
        (0x1000, 0x2000, end - 8),
        (0x1000, 0x2000, u64::MAX - 3),
        (0xffff_ffff_ffff_fff0, 0x2000, 0x3000),
    ];
    for (desc, avail, used) in cases {
        let h = harness();
        assert!(h.to_features_ok(VIRTIO_F_VERSION_1));
        h.setup_queue(0, 16, desc, avail, used);
        h.driver_ok();
        assert_eq!(h.activations(), 0, "{desc:#x} {avail:#x} {used:#x}");
        assert_needs_reset_without_activation(&h);
    }
}

#[test]
fn misaligned_rings_need_reset() {
    for (desc, avail, used) in [
        (0x1008, 0x2000, 0x3000),
        (0x1000, 0x2001, 0x3000),
        (0x1000, 0x2000, 0x3002),
    ] {
        let h = harness();
        assert!(h.to_features_ok(VIRTIO_F_VERSION_1));
        h.setup_queue(0, 16, desc, avail, used);
        assert!(h.regs().queues[0].ready);
        h.driver_ok();
        assert_eq!(h.activations(), 0);
        assert_needs_reset_without_activation(&h);
    }
}

#[test]
fn activation_error_needs_reset_then_recovers() {
    let h = harness();
    h.log.lock().unwrap().fail_activate = true;
    h.activate_all(VIRTIO_F_VERSION_1);
    assert_eq!(h.activations(), 0);
    assert_needs_reset_without_activation(&h);

    h.w(reg::STATUS, 0);
    assert_eq!(h.status(), 0);
    assert_eq!(h.r(reg::INTERRUPT_STATUS), 0);
    assert_eq!(h.resets(), 1);
    h.log.lock().unwrap().fail_activate = false;
    h.activate_all(VIRTIO_F_VERSION_1);
    assert!(h.t.is_activated());
    assert_eq!(h.activations(), 1);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

#[test]
fn reset_at_every_stage() {
    let initial = harness().regs();
    assert_eq!(initial, Registers::new(2));
    let stages: [&dyn Fn(&Harness); 7] = [
        &|h| h.w(reg::STATUS, ACKNOWLEDGE),
        &|h| {
            h.w(reg::STATUS, ACKNOWLEDGE);
            h.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
            h.write_features(VIRTIO_F_VERSION_1);
        },
        &|h| assert!(h.to_features_ok(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX)),
        &|h| {
            assert!(h.to_features_ok(VIRTIO_F_VERSION_1));
            h.setup_mock_queue(1, 64, 0x8000);
        },
        &|h| {
            h.activate_all(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
            assert!(h.t.is_activated());
            let interrupt = h.log.lock().unwrap().interrupt.clone().unwrap();
            interrupt.trigger(InterruptKind::Queue(0)).unwrap();
        },
        &|h| {
            h.log.lock().unwrap().fail_activate = true;
            h.activate_all(VIRTIO_F_VERSION_1);
            h.log.lock().unwrap().fail_activate = false;
        },
        &|h| h.w(reg::STATUS, FAILED),
    ];
    for (i, stage) in stages.iter().enumerate() {
        let h = harness();
        stage(&h);
        h.w(reg::DEVICE_FEATURES_SEL, 1);
        h.w(reg::SHM_SEL, 3);
        h.w(reg::QUEUE_SEL, 1);
        h.w(reg::QUEUE_NOTIFY, 0);
        assert_ne!(h.regs(), initial, "stage {i}");

        h.w(reg::STATUS, 0);
        assert_eq!(h.regs(), initial, "stage {i}");
        assert_eq!(h.status(), 0);
        assert_eq!(h.r(reg::INTERRUPT_STATUS), 0);
        assert!(!h.t.is_activated());
        assert_eq!(h.resets(), 1, "stage {i}");
        // Pending notifications were drained, the eventfds kept.
        let events = h.t.queue_notify_events();
        assert_eq!(events.len(), 2);
        assert!(events[0].1.read().is_err(), "stage {i}");

        // The device comes up again, with fresh state.
        let activations = h.activations();
        h.activate_all(VIRTIO_F_VERSION_1);
        assert!(h.t.is_activated(), "stage {i}");
        assert_eq!(h.activations(), activations + 1);
        let log = h.log.lock().unwrap();
        let (features, queues) = log.activations.last().unwrap();
        assert_eq!(*features, VIRTIO_F_VERSION_1);
        assert_eq!(queues.len(), 2);
        assert!(queues.iter().all(|q| !q.event_idx));
    }
}

#[test]
fn reset_while_active_stops_the_device() {
    let h = harness();
    h.activate_all(VIRTIO_F_VERSION_1);
    assert_eq!(h.resets(), 0);
    h.w(reg::STATUS, 0);
    assert_eq!(h.resets(), 1);
    assert!(h.log.lock().unwrap().interrupt.is_none());
    // Resetting a reset device is fine.
    h.w(reg::STATUS, 0);
    assert_eq!(h.resets(), 2);
    assert_eq!(h.regs(), Registers::new(2));
}

#[test]
fn queue_registers_only_between_features_ok_and_driver_ok() {
    let h = harness();
    // Before FEATURES_OK.
    h.w(reg::STATUS, ACKNOWLEDGE);
    h.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
    h.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    assert_eq!(h.regs().queues, Registers::new(2).queues);
    assert_eq!(h.t.stats().refused_writes, 8);
    // QueueSel is a selector: always writable.
    assert_eq!(h.regs().queue_sel, 0);

    // After DRIVER_OK (disabling a queue is allowed: see
    // queue_ready_can_be_cleared_after_driver_ok).
    let h = harness();
    h.activate_all(VIRTIO_F_VERSION_1);
    h.w(reg::QUEUE_SEL, 0);
    let before = h.regs();
    h.w(reg::QUEUE_NUM, 8);
    h.w(reg::QUEUE_DESC_LOW, 0x5000);
    h.w(reg::QUEUE_DEVICE_HIGH, 1);
    assert_eq!(h.regs(), before);
    assert_eq!(h.r(reg::QUEUE_READY), 1);
}

#[test]
fn queue_size_and_ready_rules() {
    let h = harness();
    assert!(h.to_features_ok(VIRTIO_F_VERSION_1));
    h.w(reg::QUEUE_SEL, 1);
    for bad in [0, 3, 48, 128, 0x1_0040, u32::MAX] {
        h.w(reg::QUEUE_NUM, bad);
        assert_eq!(h.regs().queues[1].size, 0, "{bad}");
    }
    h.w(reg::QUEUE_NUM, 64);
    assert_eq!(h.regs().queues[1].size, 64);
    h.w(reg::QUEUE_NUM, 1);
    assert_eq!(h.regs().queues[1].size, 1);
    // QueueNum is write-only.
    assert_eq!(h.r(reg::QUEUE_NUM), 0);

    // Ready needs the size and all three addresses.
    let h = harness();
    assert!(h.to_features_ok(VIRTIO_F_VERSION_1));
    h.w(reg::QUEUE_SEL, 0);
    let steps = [
        (reg::QUEUE_NUM, 16),
        (reg::QUEUE_DESC_LOW, 0x1000),
        (reg::QUEUE_DRIVER_HIGH, 0),
        (reg::QUEUE_DEVICE_LOW, 0x3000),
    ];
    for (offset, value) in steps {
        h.w(reg::QUEUE_READY, 1);
        assert_eq!(h.r(reg::QUEUE_READY), 0, "before {offset:#x}");
        h.w(offset, value);
    }
    h.w(reg::QUEUE_READY, 2);
    assert_eq!(h.r(reg::QUEUE_READY), 0);
    h.w(reg::QUEUE_READY, 1);
    assert_eq!(h.r(reg::QUEUE_READY), 1);
    // A ready queue's size and addresses are fixed until it is disabled.
    h.w(reg::QUEUE_NUM, 8);
    h.w(reg::QUEUE_DESC_LOW, 0x4000);
    assert_eq!(h.regs().queues[0].size, 16);
    assert_eq!(h.regs().queues[0].desc.value, 0x1000);
    h.w(reg::QUEUE_READY, 0);
    assert_eq!(h.r(reg::QUEUE_READY), 0);
    h.w(reg::QUEUE_NUM, 8);
    assert_eq!(h.regs().queues[0].size, 8);

    // A queue that does not exist takes nothing.
    h.w(reg::QUEUE_SEL, 2);
    let before = h.regs();
    h.setup_queue(2, 16, 0x1000, 0x2000, 0x3000);
    let mut expected = before.clone();
    expected.queue_sel = 2;
    assert_eq!(h.regs(), expected);
    assert_eq!(h.r(reg::QUEUE_READY), 0);
}

#[test]
fn queue_reset_is_not_offered() {
    let h = harness();
    assert!(h.to_features_ok(VIRTIO_F_VERSION_1));
    h.setup_mock_queue(0, 16, 0x1000);
    let before = h.regs();
    h.w(reg::QUEUE_RESET, 1);
    assert_eq!(h.regs(), before);
    assert_eq!(h.r(reg::QUEUE_RESET), 0);
}

#[test]
fn bad_widths_and_offsets_read_zero_and_are_counted() {
    let h = harness();
    // A 2-byte read of MagicValue, a misaligned 4-byte read, an 8-byte read.
    let mut two = [0xff; 2];
    h.t.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    let mut four = [0xff; 4];
    h.t.read(reg::VERSION + 1, &mut four);
    assert_eq!(four, [0; 4]);
    let mut eight = [0xff; 8];
    h.t.read(reg::MAGIC_VALUE, &mut eight);
    assert_eq!(eight, [0; 8]);
    assert_eq!(h.t.stats().bad_widths, 3);

    // Byte and 8-byte writes of Status are dropped.
    h.t.write(reg::STATUS, &[1]);
    h.t.write(reg::STATUS, &1u64.to_le_bytes());
    h.t.write(reg::STATUS + 2, &1u32.to_le_bytes());
    assert_eq!(h.status(), 0);
    assert_eq!(h.t.stats().bad_widths, 6);

    // Offsets with no register; write-only registers read; read-only ones written.
    for offset in [0x018, 0x040, 0x0c4, 0x0f8] {
        assert_eq!(h.r(offset), 0);
        h.w(offset, 1);
    }
    assert_eq!(h.r(reg::QUEUE_NOTIFY), 0);
    h.w(reg::MAGIC_VALUE, 0);
    h.w(reg::INTERRUPT_STATUS, 3);
    h.w(reg::CONFIG_GENERATION, 3);
    assert_eq!(h.r(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.t.stats().unknown_registers, 12);

    // Configuration space accesses leaving the window.
    let mut data = [0xff; 8];
    h.t.read(MMIO_WINDOW_SIZE - 4, &mut data);
    assert_eq!(data, [0; 8]);
    h.t.read(u64::MAX - 3, &mut data);
    h.t.write(MMIO_WINDOW_SIZE, &[1]);
    h.t.write(u64::MAX, &[1]);
    assert_eq!(h.t.stats().unknown_registers, 16);
    assert!(h.log.lock().unwrap().config_writes.is_empty());
}

#[test]
fn random_accesses_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let h = harness();
    // Several passes from different stages: fresh, features negotiated, activated.
    for pass in 0..6 {
        match pass % 3 {
            0 => h.w(reg::STATUS, 0),
            1 => {
                h.w(reg::STATUS, 0);
                h.to_features_ok(VIRTIO_F_VERSION_1);
            }
            _ => {
                h.w(reg::STATUS, 0);
                h.activate_all(VIRTIO_F_VERSION_1);
            }
        }
        for offset in 0..0x100u64 {
            for width in [1usize, 2, 4, 8] {
                let value = rng.next().to_le_bytes();
                let mut data = [0xffu8; 8];
                h.t.read(offset, &mut data[..width]);
                h.t.write(offset, &value[..width]);
                if width == 4 && offset % 4 == 0 {
                    // Also a small value, to reach index- and status-like paths.
                    let small = (rng.next() % 300) as u32;
                    h.t.write(offset, &small.to_le_bytes());
                }
            }
        }
        // The config space and the window's end, any width.
        for _ in 0..512 {
            let offset = 0x100 + rng.next() % (MMIO_WINDOW_SIZE - 0x100 + 16);
            let width = [1usize, 2, 4, 8][(rng.next() % 4) as usize];
            let value = rng.next().to_le_bytes();
            let mut data = [0xffu8; 8];
            h.t.read(offset, &mut data[..width]);
            h.t.write(offset, &value[..width]);
        }
    }
    // Still a working transport.
    h.w(reg::STATUS, 0);
    assert_eq!(h.regs(), Registers::new(2));
    h.activate_all(VIRTIO_F_VERSION_1);
    assert!(h.t.is_activated());
}

#[test]
fn queue_notify_signals_the_eventfd() {
    let h = harness();
    let events = h.t.queue_notify_events();
    assert_eq!(
        events.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert_eq!(QUEUE_NOTIFY_OFFSET, 0x50);

    // Before activation too: it is what an ioeventfd would do.
    h.w(reg::QUEUE_NOTIFY, 1);
    assert_eq!(events[1].1.read().unwrap(), 1);
    assert!(events[0].1.read().is_err());

    h.activate_all(VIRTIO_F_VERSION_1);
    h.w(reg::QUEUE_NOTIFY, 0);
    h.w(reg::QUEUE_NOTIFY, 0);
    {
        let log = h.log.lock().unwrap();
        assert_eq!(log.notifies[0].read().unwrap(), 2);
        assert!(log.notifies[1].read().is_err());
    }
    // Nonexistent queues are ignored.
    let refused = h.t.stats().refused_writes;
    h.w(reg::QUEUE_NOTIFY, 2);
    h.w(reg::QUEUE_NOTIFY, u32::MAX);
    assert_eq!(h.t.stats().refused_writes, refused + 2);
    assert_eq!(h.t.stats().queue_notifies, 3);
    assert!(events.iter().all(|(_, e)| e.read().is_err()));
}

#[test]
fn interrupts_set_status_and_signal_irq() {
    let h = harness();
    h.activate_all(VIRTIO_F_VERSION_1);
    let interrupt = h.log.lock().unwrap().interrupt.clone().unwrap();
    assert_eq!(h.irq_count(), 0);

    interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    assert_eq!(h.r(reg::INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
    assert_eq!(h.irq_count(), 1);
    interrupt.trigger(InterruptKind::Config).unwrap();
    interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(
        h.r(reg::INTERRUPT_STATUS),
        INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(h.irq_count(), 2);

    h.w(reg::INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
    assert_eq!(h.r(reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    h.w(reg::INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE | 0xf0);
    assert_eq!(h.r(reg::INTERRUPT_STATUS), 0);
    // InterruptACK is write-only.
    assert_eq!(h.r(reg::INTERRUPT_ACK), 0);

    // The transport's own handle is the same interrupt.
    h.t.interrupt().trigger(InterruptKind::Config).unwrap();
    assert_eq!(h.r(reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(h.irq_count(), 1);
}

#[test]
fn config_space_is_forwarded() {
    let h = harness();
    let read = |offset: u64, width: usize| {
        let mut data = [0xffu8; 8];
        h.t.read(offset, &mut data[..width]);
        data[..width].to_vec()
    };
    assert_eq!(read(0x100, 1), vec![0xa0]);
    assert_eq!(read(0x104, 4), vec![0xa4, 0xa5, 0xa6, 0xa7]);
    assert_eq!(read(0x103, 2), vec![0xa3, 0xa4]);
    assert_eq!(read(0x108, 8), (0xa8..=0xaf).collect::<Vec<u8>>());
    // Past the device's 16 bytes: zeroes, not the bus's all ones.
    assert_eq!(read(0x10c, 8), vec![0xac, 0xad, 0xae, 0xaf, 0, 0, 0, 0]);
    assert_eq!(read(0xffc, 4), vec![0; 4]);

    h.t.write(0x102, &[1, 2]);
    h.t.write(0x10f, &[9]);
    h.t.write(0x100, &[7; 8]);
    assert_eq!(read(0x101, 2), vec![7, 7]);
    assert_eq!(read(0x10f, 1), vec![9]);
    assert_eq!(
        h.log.lock().unwrap().config_writes,
        vec![(2, vec![1, 2]), (0xf, vec![9]), (0, vec![7; 8])]
    );
    assert_eq!(h.r(reg::CONFIG_GENERATION), 7);
    assert_eq!(h.t.stats(), TransportStats::default());
}

#[test]
fn poisoned_lock_is_recovered() {
    let h = harness();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let _guard = h.t.inner.lock().unwrap();
            panic!("poisoning the transport lock on purpose");
        })
        .join()
    });
    assert!(result.is_err());
    assert!(h.t.inner.is_poisoned());
    assert_eq!(h.r(reg::STATUS), 0);
    h.activate_all(VIRTIO_F_VERSION_1);
    assert!(h.t.is_activated());
}

#[test]
fn works_on_a_bus() {
    let h = harness();
    let t = Arc::new(h.t);
    let bus = ember_bus::Bus::new(ember_bus::BusKind::Mmio);
    bus.insert(0xd000_0000, MMIO_WINDOW_SIZE, t.clone())
        .unwrap();
    let mut data = [0u8; 4];
    bus.read(0xd000_0000, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), 0x7472_6976);
    bus.write(0xd000_0000 + reg::STATUS, &ACKNOWLEDGE.to_le_bytes())
        .unwrap();
    bus.read(0xd000_0000 + reg::STATUS, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), ACKNOWLEDGE);
}

#[test]
fn queue_ready_can_be_cleared_after_driver_ok() {
    // Regression: drivers tear queues down by writing QueueReady 0 and waiting to read
    // 0 back (Linux's vm_del_vq, virtio-drivers' queue_unset); refusing the write after
    // DRIVER_OK made virtio-drivers spin forever.
    let h = harness();
    h.activate_all(VIRTIO_F_VERSION_1);
    h.w(reg::QUEUE_SEL, 1);
    assert_eq!(h.r(reg::QUEUE_READY), 1);
    h.w(reg::QUEUE_READY, 0);
    assert_eq!(h.r(reg::QUEUE_READY), 0);
    // Setting it up again still needs a reset first.
    h.w(reg::QUEUE_READY, 1);
    assert_eq!(h.r(reg::QUEUE_READY), 0);
    h.w(reg::QUEUE_NUM, 8);
    assert_eq!(h.activations(), 1);
    // Queue 0 is untouched.
    h.w(reg::QUEUE_SEL, 0);
    assert_eq!(h.r(reg::QUEUE_READY), 1);
}
