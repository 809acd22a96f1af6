//! Lookup and dispatch of one access on an `ember_bus::Bus`, with 1, 8 and 64 devices
//! (the target in the middle), and the unclaimed-address path.
//!
//! `cargo bench -p ember-benches --bench bus_dispatch`

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use ember_benches::device::{populate, MMIO_BASE, MMIO_STRIDE, PIO_BASE, PIO_STRIDE};
use ember_bus::{Bus, BusKind};

const DEVICE_COUNTS: [usize; 3] = [1, 8, 64];

fn pio_bus(count: usize) -> (Bus, ember_benches::device::Target) {
    let bus = Bus::new(BusKind::Pio);
    let target = populate(&bus, PIO_BASE, PIO_STRIDE, count).expect("PIO layout");
    (bus, target)
}

fn mmio_bus(count: usize) -> (Bus, ember_benches::device::Target) {
    let bus = Bus::new(BusKind::Mmio);
    let target = populate(&bus, MMIO_BASE, MMIO_STRIDE, count).expect("MMIO layout");
    (bus, target)
}

/// Short runs: each benchmark takes about 2.5 s, the whole file well under a minute.
fn short(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
        .nresamples(10_000);
}

/// No plots (they take longer than the measurements); command-line flags still apply.
fn config() -> Criterion {
    Criterion::default().without_plots()
}

fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch");
    short(&mut group);
    for count in DEVICE_COUNTS {
        let (bus, target) = pio_bus(count);
        group.bench_with_input(
            BenchmarkId::new("pio_write_1B", count),
            &target.addr,
            |b, &port| {
                b.iter(|| bus.write(black_box(port), black_box(&[0x2a])));
            },
        );
        assert!(
            target.device.writes() > 0,
            "PIO writes never reached the device"
        );

        let (bus, target) = mmio_bus(count);
        group.bench_with_input(
            BenchmarkId::new("mmio_read_4B", count),
            &target.addr,
            |b, &addr| {
                b.iter(|| {
                    let mut data = [0u8; 4];
                    let result = bus.read(black_box(addr), black_box(&mut data));
                    black_box((result, data))
                });
            },
        );
        assert!(
            target.device.reads() > 0,
            "MMIO reads never reached the device"
        );
    }
    group.finish();
}

fn unclaimed(c: &mut Criterion) {
    let mut group = c.benchmark_group("unclaimed");
    short(&mut group);
    for count in DEVICE_COUNTS {
        let (bus, target) = pio_bus(count);
        group.bench_with_input(
            BenchmarkId::new("pio_write_1B", count),
            &target.unclaimed,
            |b, &port| {
                b.iter(|| bus.write(black_box(port), black_box(&[0x2a])));
            },
        );
        assert!(bus.stats().unclaimed_writes > 0);

        let (bus, target) = mmio_bus(count);
        group.bench_with_input(
            BenchmarkId::new("mmio_read_4B", count),
            &target.unclaimed,
            |b, &addr| {
                b.iter(|| {
                    let mut data = [0u8; 4];
                    let result = bus.read(black_box(addr), black_box(&mut data));
                    black_box((result, data))
                });
            },
        );
        assert!(bus.stats().unclaimed_reads > 0);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = dispatch, unclaimed
}
criterion_main!(benches);
