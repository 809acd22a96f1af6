//! Lookup and dispatch of one access (a 1-byte PIO write, a 4-byte MMIO read) with 1, 8
//! and 64 devices on the bus (the target in the middle), side by side:
//!
//! * `handle`: Ember through a per-vCPU [`ember_bus::BusHandle`] (the exit-path API);
//! * `bus`: Ember through `Bus::read` / `Bus::write` on the shared `Bus`;
//! * `io_manager`: rust-vmm's `vm_device::device_manager::IoManager`, called through
//!   `&IoManager` with no lock (its best case: it needs `&mut` to change, so a VMM that
//!   hot-plugs must add one);
//! * `io_manager_mutex`: the same behind a `Mutex`, as rust-vmm's reference VMM shares it
//!   between vCPUs (`Arc<Mutex<IoManager>>`).
//!
//! Every variant dispatches to the same device code ([`Latch`], a 32-bit register on
//! atomics) through one `Arc<dyn …>` indirection; `direct` calls that device through its
//! `Arc<dyn BusDevice>` with no lookup at all (the floor). `random` aims each access
//! at a device drawn from a fixed pseudo-random sequence of 4096 (so neither the
//! handle's last-device check nor the branch predictor can settle on one), `unclaimed`
//! at a gap next to the target. At the end a table of the medians and ratios of this run is printed.
//!
//! The clock is criterion's wall clock, or with `EMBER_BENCH_CLOCK=cpu` the thread's CPU
//! time (`CLOCK_THREAD_CPUTIME_ID`), which leaves out the time other processes take on
//! a shared machine.
//!
//! `cargo bench -p ember-benches --bench bus_dispatch`

mod common;
use common::{median_ns, run_groups, CpuTime};
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use criterion::measurement::{Measurement, WallTime};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion};
use ember_benches::device::{MMIO_BASE, MMIO_STRIDE, PIO_BASE, PIO_STRIDE, REGISTER_LEN};
use ember_bus::{Bus, BusDevice, BusKind};
use vm_device::bus::{
    MmioAddress, MmioAddressOffset, MmioRange, PioAddress, PioAddressOffset, PioRange,
};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

const DEVICE_COUNTS: [usize; 3] = [1, 8, 64];
/// Length of the address sequence of the `random` benchmarks (a power of two).
const RANDOM_LEN: usize = 4096;

/// A 32-bit register at offset 0 (little endian, as wide as the access; an 8-byte read
/// leaves the high half as it found it), counting accesses. Fixed-width copies only, so
/// that the device costs a few instructions and the lookup is what the numbers show.
/// The counters use a plain load and store: exact with one thread, as here.
#[derive(Debug, Default)]
struct Latch {
    value: AtomicU32,
    reads: AtomicU64,
    writes: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

impl Latch {
    #[inline]
    fn load(&self, data: &mut [u8]) {
        let v = self.value.load(Ordering::Relaxed).to_le_bytes();
        match data.len() {
            1 => data[0] = v[0],
            2 => data.copy_from_slice(&v[..2]),
            4 => data.copy_from_slice(&v),
            8 => data[..4].copy_from_slice(&v),
            _ => {}
        }
        bump(&self.reads);
    }

    #[inline]
    fn store(&self, data: &[u8]) {
        let v = match *data {
            [a] => u32::from(a),
            [a, b] => u32::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] | [a, b, c, d, _, _, _, _] => u32::from_le_bytes([a, b, c, d]),
            _ => return,
        };
        self.value.store(v, Ordering::Relaxed);
        bump(&self.writes);
    }
}

impl BusDevice for Latch {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        self.load(data);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        self.store(data);
    }
}

impl DevicePio for Latch {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        self.load(data);
    }
    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        self.store(data);
    }
}

impl DeviceMmio for Latch {
    fn mmio_read(&self, _base: MmioAddress, _offset: MmioAddressOffset, data: &mut [u8]) {
        self.load(data);
    }
    fn mmio_write(&self, _base: MmioAddress, _offset: MmioAddressOffset, data: &[u8]) {
        self.store(data);
    }
}

/// `count` latches, `stride` apart from `base`, on an Ember bus and on an `IoManager`
/// (the same device objects on both).
struct Layout {
    bus: Bus,
    manager: IoManager,
    devices: Vec<Arc<Latch>>,
    /// Base address of each device.
    addrs: Vec<u64>,
}

impl Layout {
    fn new(kind: BusKind, count: usize) -> Layout {
        let (base, stride) = match kind {
            BusKind::Pio => (PIO_BASE, PIO_STRIDE),
            BusKind::Mmio => (MMIO_BASE, MMIO_STRIDE),
        };
        let bus = Bus::new(kind);
        let mut manager = IoManager::new();
        let mut devices = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..count as u64 {
            let device = Arc::new(Latch::default());
            let addr = base + stride * i;
            bus.insert(addr, REGISTER_LEN, device.clone())
                .expect("Ember layout");
            match kind {
                BusKind::Pio => {
                    let port = PioAddress(addr as PioAddressOffset);
                    let range = PioRange::new(port, REGISTER_LEN as PioAddressOffset);
                    manager.register_pio(range.expect("PIO range"), device.clone())
                }
                BusKind::Mmio => {
                    let range = MmioRange::new(MmioAddress(addr), REGISTER_LEN);
                    manager.register_mmio(range.expect("MMIO range"), device.clone())
                }
            }
            .expect("IoManager layout");
            devices.push(device);
            addrs.push(addr);
        }
        Layout {
            bus,
            manager,
            devices,
            addrs,
        }
    }

    /// The device in the middle, which the fixed-address benchmarks aim at.
    fn target(&self) -> (u64, &Arc<Latch>) {
        let i = self.devices.len() / 2;
        (self.addrs[i], &self.devices[i])
    }

    /// 4096 device addresses drawn with a fixed linear congruential generator.
    fn random(&self) -> Vec<u64> {
        let mut x = 0x5eed_u64;
        (0..RANDOM_LEN)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                self.addrs[((x >> 33) % self.addrs.len() as u64) as usize]
            })
            .collect()
    }
}

/// Short runs: each benchmark takes about 1.5 s, the whole file about a minute.
fn short<M: Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000))
        .sample_size(40)
        .nresamples(10_000);
}

fn pio_write<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group("pio_write_1B");
    short(&mut group);
    for count in DEVICE_COUNTS {
        let mut layout = Layout::new(BusKind::Pio, count);
        let (port, device) = layout.target();
        let device = Arc::clone(device);
        let direct: Arc<dyn BusDevice> = device.clone();
        group.bench_function(BenchmarkId::new("direct", count), |b| {
            b.iter(|| black_box(&direct).write(black_box(0), black_box(&[0x2a])));
        });
        let mut handle = layout.bus.handle();
        group.bench_function(BenchmarkId::new("handle", count), |b| {
            b.iter(|| handle.write(black_box(port), black_box(&[0x2a])));
        });
        let bus = &layout.bus;
        group.bench_function(BenchmarkId::new("bus", count), |b| {
            b.iter(|| bus.write(black_box(port), black_box(&[0x2a])));
        });
        let manager = &layout.manager;
        let vm_port = PioAddress(port as PioAddressOffset);
        let before = device.writes.load(Ordering::Relaxed);
        // Accesses made (none when a filter skips this benchmark).
        let mut calls = 0u64;
        group.bench_function(BenchmarkId::new("io_manager", count), |b| {
            b.iter(|| {
                calls += 1;
                manager.pio_write(black_box(vm_port), black_box(&[0x2a]))
            });
        });
        assert_eq!(
            device.writes.load(Ordering::Relaxed) - before,
            calls,
            "IoManager missed"
        );
        let locked = Mutex::new(std::mem::take(&mut layout.manager));
        group.bench_function(BenchmarkId::new("io_manager_mutex", count), |b| {
            b.iter(|| {
                let manager = locked.lock().expect("IoManager lock");
                manager.pio_write(black_box(vm_port), black_box(&[0x2a]))
            });
        });
        assert_eq!(layout.bus.stats(), Default::default(), "Ember missed");
    }
    group.finish();
}

fn mmio_read<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group("mmio_read_4B");
    short(&mut group);
    for count in DEVICE_COUNTS {
        let mut layout = Layout::new(BusKind::Mmio, count);
        let (addr, device) = layout.target();
        let device = Arc::clone(device);
        device.value.store(0x1234_5678, Ordering::Relaxed);
        let direct: Arc<dyn BusDevice> = device.clone();
        group.bench_function(BenchmarkId::new("direct", count), |b| {
            b.iter(|| {
                let mut data = [0xffu8; 4];
                black_box(&direct).read(black_box(0), black_box(&mut data));
                data
            });
        });
        let mut handle = layout.bus.handle();
        group.bench_function(BenchmarkId::new("handle", count), |b| {
            b.iter(|| {
                let mut data = [0u8; 4];
                let result = handle.read(black_box(addr), black_box(&mut data));
                (result, data)
            });
        });
        let bus = &layout.bus;
        group.bench_function(BenchmarkId::new("bus", count), |b| {
            b.iter(|| {
                let mut data = [0u8; 4];
                let result = bus.read(black_box(addr), black_box(&mut data));
                (result, data)
            });
        });
        let manager = &layout.manager;
        let vm_addr = MmioAddress(addr);
        group.bench_function(BenchmarkId::new("io_manager", count), |b| {
            b.iter(|| {
                let mut data = [0u8; 4];
                let result = manager.mmio_read(black_box(vm_addr), black_box(&mut data));
                (result.is_ok(), data)
            });
        });
        let locked = Mutex::new(std::mem::take(&mut layout.manager));
        group.bench_function(BenchmarkId::new("io_manager_mutex", count), |b| {
            b.iter(|| {
                let manager = locked.lock().expect("IoManager lock");
                let mut data = [0u8; 4];
                let result = manager.mmio_read(black_box(vm_addr), black_box(&mut data));
                (result.is_ok(), data)
            });
        });
        let mut data = [0u8; 4];
        handle.read(addr, &mut data).expect("Ember read");
        assert_eq!(u32::from_le_bytes(data), 0x1234_5678);
        let manager = locked.lock().expect("IoManager lock");
        manager
            .mmio_read(vm_addr, &mut data)
            .expect("IoManager read");
        assert_eq!(u32::from_le_bytes(data), 0x1234_5678);
    }
    group.finish();
}

/// Each access goes to a device drawn at random (a fixed sequence, the same for all).
fn random<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group("pio_write_1B_random");
    short(&mut group);
    for count in [8, 64] {
        let layout = Layout::new(BusKind::Pio, count);
        let ports = layout.random();
        let vm_ports: Vec<_> = ports
            .iter()
            .map(|&p| PioAddress(p as PioAddressOffset))
            .collect();
        // The sequence visits every device (so caches cannot hold just one).
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), count, "the random sequence misses devices");
        let mut i = 0;
        // Accesses made, to check below that each one reached a device.
        let mut calls = 0u64;
        let mut handle = layout.bus.handle();
        group.bench_function(BenchmarkId::new("handle", count), |b| {
            b.iter(|| {
                i = (i + 1) % RANDOM_LEN;
                calls += 1;
                handle.write(black_box(ports[i]), black_box(&[0x2a]))
            });
        });
        let bus = &layout.bus;
        group.bench_function(BenchmarkId::new("bus", count), |b| {
            b.iter(|| {
                i = (i + 1) % RANDOM_LEN;
                calls += 1;
                bus.write(black_box(ports[i]), black_box(&[0x2a]))
            });
        });
        let manager = &layout.manager;
        group.bench_function(BenchmarkId::new("io_manager", count), |b| {
            b.iter(|| {
                i = (i + 1) % RANDOM_LEN;
                calls += 1;
                manager.pio_write(black_box(vm_ports[i]), black_box(&[0x2a]))
            });
        });
        assert_eq!(layout.bus.stats(), Default::default(), "Ember missed");
        let hits: u64 = layout
            .devices
            .iter()
            .map(|d| d.writes.load(Ordering::Relaxed))
            .sum();
        assert_eq!(hits, calls, "an access did not reach its device");
    }
    group.finish();
}

/// A miss: the address right after the target, in the gap before the next device.
fn unclaimed<M: Measurement>(c: &mut Criterion<M>) {
    let mut group = c.benchmark_group("unclaimed");
    short(&mut group);
    for count in DEVICE_COUNTS {
        let layout = Layout::new(BusKind::Pio, count);
        let gap = layout.target().0 + REGISTER_LEN;
        let mut handle = layout.bus.handle();
        // Accesses made (none when a filter skips this benchmark).
        let mut calls = 0u64;
        group.bench_function(BenchmarkId::new("pio_write_1B_handle", count), |b| {
            b.iter(|| {
                calls += 1;
                handle.write(black_box(gap), black_box(&[0x2a]))
            });
        });
        assert_eq!(layout.bus.stats().unclaimed_writes, calls);
        let manager = &layout.manager;
        let vm_gap = PioAddress(gap as PioAddressOffset);
        group.bench_function(BenchmarkId::new("pio_write_1B_io_manager", count), |b| {
            b.iter(|| manager.pio_write(black_box(vm_gap), black_box(&[0x2a])));
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------
// Run and summary; the clock and result helpers are in `common/mod.rs`.

/// Every group of this file.
fn groups<M: Measurement + 'static>(c: &mut Criterion<M>) {
    pio_write(c);
    mmio_read(c);
    random(c);
    unclaimed(c);
}

fn summary(clock: &str, since: SystemTime) {
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    println!("\nSummary ({clock} clock): median ns per access; ratios = IoManager / Ember handle");
    println!(
        "{:<22} {:>4} {:>7} {:>7} {:>7} {:>8} {:>9} {:>10} {:>11}",
        "access",
        "devs",
        "direct",
        "handle",
        "bus",
        "io_mgr",
        "io_mgr_mx",
        "io_mgr/h",
        "io_mgr_mx/h"
    );
    let groups = [
        ("pio_write_1B", &DEVICE_COUNTS[..]),
        ("mmio_read_4B", &DEVICE_COUNTS[..]),
        ("pio_write_1B_random", &[8, 64][..]),
    ];
    for (group, counts) in groups {
        for &count in counts {
            let m = |variant: &str| median_ns(group, &format!("{variant}/{count}"), since);
            let (handle, iom, iom_mx) = (m("handle"), m("io_manager"), m("io_manager_mutex"));
            println!(
                "{:<22} {:>4} {:>7} {:>7} {:>7} {:>8} {:>9} {:>10} {:>11}",
                group,
                count,
                fmt(m("direct")),
                fmt(handle),
                fmt(m("bus")),
                fmt(iom),
                fmt(iom_mx),
                ratio(iom, handle),
                ratio(iom_mx, handle),
            );
        }
    }
    for count in DEVICE_COUNTS {
        let m = |variant: &str| median_ns("unclaimed", &format!("{variant}/{count}"), since);
        let (handle, iom) = (m("pio_write_1B_handle"), m("pio_write_1B_io_manager"));
        println!(
            "{:<22} {:>4} {:>7} {:>7} {:>7} {:>8} {:>9} {:>10} {:>11}",
            "unclaimed_pio_write",
            count,
            "-",
            fmt(handle),
            "-",
            fmt(iom),
            "-",
            ratio(iom, handle),
            "-",
        );
    }
    println!("(targets: handle <= 15 ns, io_mgr/h >= 3x)");
}

fn main() {
    let since = SystemTime::now();
    let clock = run_groups(groups::<CpuTime>, groups::<WallTime>);
    summary(clock, since);
}
