//! A guest hammering a device with what it logs about produces a bounded number of log
//! lines: each guest-triggered message is rate-limited per call site, with a count of
//! what was suppressed. (A test binary of its own: it installs the process's logger.)

use std::sync::Arc;

use ember_rate_limiter::testing::{max_lines, LogRecorder};

use ember_bus::BusDevice;
use ember_devices::{AcpiShutdown, BootDone, DebugExit, ExitSignal, I8042};

/// Lines containing `needle`.
fn count(needle: &str) -> usize {
    LogRecorder::install().count(needle)
}

/// Writes per kind: without the limiter, as many lines.
const HAMMER: usize = 100_000;

#[test]
fn guest_triggered_lines_are_bounded() {
    LogRecorder::install();
    let started = std::time::Instant::now();

    let exit = Arc::new(ExitSignal::new().unwrap());
    let acpi = AcpiShutdown::new(Arc::clone(&exit));
    let i8042 = I8042::new(Arc::clone(&exit)).unwrap();
    let boot_done = BootDone::new(std::time::Instant::now());
    for i in 0..HAMMER {
        // ACPI sleep type 3 (S3): warned about, ignored.
        acpi.write(0, &[(3 << 2) | 0x20]);
        acpi.write(1 + (i as u64 % 3), &[0xaa]);
        // An unsupported i8042 command, a keyboard byte, a write between the ports.
        i8042.write(4, &[0x12]);
        i8042.write(0, &[0x34]);
        i8042.write(2, &[0x56]);
        boot_done.write(0, &[0x99]);
    }
    // Then the guest asks to end the VM, over and over.
    let debug_exit = DebugExit::new(Arc::clone(&exit));
    for _ in 0..HAMMER {
        debug_exit.write(0, &[7]);
        i8042.write(4, &[0xfe]);
        acpi.write(0, &[(5 << 2) | 0x20]);
    }

    for needle in [
        "ACPI sleep type 3",
        "ACPI shutdown register: ignoring write of 0xaa at offset",
        "i8042: ignoring unsupported command 0x12",
        "i8042: ignoring keyboard byte 0x34",
        "i8042: ignoring write of 0x56",
        "boot-done: ignoring write of 0x99",
        "guest wrote 0x07 to the debug-exit port",
        "guest requested a reset through the i8042",
        "guest powered off through ACPI",
        "exit already requested",
    ] {
        let n = count(needle);
        // One call site's worth (each needle is one site).
        let bound = max_lines(1, started);
        assert!(
            (1..=bound).contains(&n),
            "{n} lines with {needle:?} for {HAMMER} guest writes"
        );
    }
    // The first request still won.
    assert_eq!(
        exit.requested(),
        Some(ember_devices::ExitRequest::DebugExit(7))
    );
}
