//! The legacy PIO devices on a bus, as a guest reaches them: the i8042 ([`ember_devices::I8042`]),
//! the debug-exit port and the boot-done port, with random accesses of any width at
//! any port around them.
//!
//! Checked against a model: the VM is asked to end exactly by the first reset command
//! (`0xfe` written to port `0x64`) or debug-exit write, with that request; the i8042
//! reads as 0; the boot time is recorded by the first magic write only.

use std::sync::Arc;
use std::time::Instant;

use ember_bus::{Bus, BusKind};
use ember_devices::{
    BootDone, DebugExit, ExitRequest, ExitSignal, BOOT_DONE_MAGIC, BOOT_DONE_PORT,
    BOOT_DONE_PORT_SIZE, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE, I8042, I8042_PORT, I8042_PORT_SIZE,
};

use crate::{decode, input_struct};

input_struct! {
    /// The accesses.
    pub struct I8042Input {
        pub ops: Vec<PortOp>,
    }
}

input_struct! {
    /// `kind % 2`: write or read `width % 5` bytes (0 to 4) of `value` at a port:
    /// `port % 3` picks around the i8042 (`0x5e + port % 10`), the debug-exit and
    /// boot-done ports (`0xf3 + port % 4`), or any port.
    pub struct PortOp {
        pub kind: u8,
        pub port: u16,
        pub width: u8,
        pub value: u8,
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<I8042Input>(data) else {
        return;
    };
    let exit = Arc::new(ExitSignal::new().expect("eventfd"));
    let bus = Bus::new(BusKind::Pio);
    bus.insert(
        I8042_PORT.into(),
        I8042_PORT_SIZE,
        Arc::new(I8042::new(Arc::clone(&exit)).expect("i8042")),
    )
    .expect("insert");
    bus.insert(
        DEBUG_EXIT_PORT.into(),
        DEBUG_EXIT_PORT_SIZE,
        Arc::new(DebugExit::new(Arc::clone(&exit))),
    )
    .expect("insert");
    let boot = Arc::new(BootDone::new(Instant::now()));
    bus.insert(BOOT_DONE_PORT.into(), BOOT_DONE_PORT_SIZE, boot.clone())
        .expect("insert");

    let mut expected: Option<ExitRequest> = None;
    let mut booted = false;
    for op in input.ops.iter().take(512) {
        let port = match op.port % 3 {
            0 => 0x5e + u64::from(op.port / 3 % 10),
            1 => 0xf3 + u64::from(op.port / 3 % 4),
            _ => u64::from(op.port),
        };
        let width = usize::from(op.width % 5);
        let claimed = |p: u64, base: u16, len: u64| {
            p >= u64::from(base) && p + width as u64 <= u64::from(base) + len
        };
        let delivered = matches!(width, 1 | 2 | 4);
        if op.kind % 2 == 0 {
            let result = bus.write(port, &vec![op.value; width]);
            if delivered && result.is_ok() {
                if port == u64::from(I8042_PORT) + 4 && op.value == 0xfe {
                    expected.get_or_insert(ExitRequest::Reset);
                }
                if port == u64::from(DEBUG_EXIT_PORT) {
                    expected.get_or_insert(ExitRequest::DebugExit(op.value));
                }
                if port == u64::from(BOOT_DONE_PORT) && op.value == BOOT_DONE_MAGIC {
                    booted = true;
                }
            }
        } else {
            let mut data = vec![0x33u8; width];
            let result = bus.read(port, &mut data);
            if result.is_ok() && claimed(port, I8042_PORT, I8042_PORT_SIZE) {
                assert_eq!(data[0], 0, "i8042 read");
                assert!(
                    data[1..].iter().all(|&b| b == 0xff),
                    "i8042 wide read {data:?}"
                );
            }
        }
        assert_eq!(exit.requested(), expected, "after {op:?}");
        assert_eq!(boot.boot_time().is_some(), booted);
    }
}
