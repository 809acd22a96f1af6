//! The legacy PIO devices on a bus, as a guest reaches them: the i8042 ([`ember_devices::I8042`]),
//! the ACPI shutdown register ([`ember_devices::AcpiShutdown`]), the debug-exit port and
//! the boot-done port, with random accesses of any width at any port around them.
//!
//! Checked against a model: the VM is asked to end exactly by the first reset command
//! (`0xfe` written to port `0x64`), ACPI power-off (`SLP_EN` with sleep type 5) or reset
//! value, or debug-exit write, with that request; every i8042 read (status, answers to
//! its controller commands, the CTR) is what the model of its command set predicts; the
//! ACPI register reads 0; the boot time is recorded by the first magic write only.

use std::sync::Arc;
use std::time::Instant;

use ember_bus::{Bus, BusKind};
use ember_devices::{
    AcpiShutdown, BootDone, DebugExit, ExitRequest, ExitSignal, ACPI_RESET_VALUE,
    ACPI_SHUTDOWN_PORT, ACPI_SHUTDOWN_PORT_SIZE, BOOT_DONE_MAGIC, BOOT_DONE_PORT,
    BOOT_DONE_PORT_SIZE, DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_SIZE, I8042, I8042_PORT, I8042_PORT_SIZE,
    S5_SLEEP_TYPE,
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
    /// `port % 4` picks around the i8042 (`0x5e + port / 4 % 10`), the debug-exit and
    /// boot-done ports (`0xf3 + port / 4 % 4`), the ACPI shutdown register
    /// (`0x5fe + port / 4 % 4`), or any port.
    pub struct PortOp {
        pub kind: u8,
        pub port: u16,
        pub width: u8,
        pub value: u8,
    }
}

/// The i8042 as `ember_devices::I8042` documents it.
#[derive(Debug)]
struct I8042Model {
    ctr: u8,
    output_port: u8,
    output: Option<u8>,
    pending: Option<u8>,
    last_was_command: bool,
}

impl I8042Model {
    fn new() -> Self {
        I8042Model {
            ctr: 0x64,
            output_port: 0x03,
            output: None,
            pending: None,
            last_was_command: false,
        }
    }

    /// A write at bus offset `offset`; returns whether it is the reset command.
    fn write(&mut self, offset: u64, value: u8) -> bool {
        match offset {
            0 => {
                self.last_was_command = false;
                match self.pending.take() {
                    Some(0x60) => self.ctr = value,
                    Some(0xd1) => self.output_port = value,
                    Some(0xd2 | 0xd3) => self.output = Some(value),
                    _ => {}
                }
            }
            4 => {
                self.last_was_command = true;
                self.pending = None;
                match value {
                    0x20 => self.output = Some(self.ctr),
                    0xd0 => self.output = Some(self.output_port),
                    0x60 | 0xd1..=0xd4 => self.pending = Some(value),
                    0xa7 => self.ctr |= 0x20,
                    0xa9 => self.output = Some(0x02),
                    0xaa => self.output = Some(0x55),
                    0xab => self.output = Some(0x00),
                    0xad => self.ctr |= 0x10,
                    0xae => self.ctr &= !0x10,
                    0xfe => return true,
                    _ => {}
                }
            }
            _ => {}
        }
        false
    }

    /// A read at bus offset `offset`: the byte the device must return.
    fn read(&mut self, offset: u64) -> u8 {
        match offset {
            0 => self.output.take().unwrap_or(0),
            4 => 0x14 | u8::from(self.output.is_some()) | (u8::from(self.last_was_command) << 3),
            _ => 0,
        }
    }
}

/// What the ACPI shutdown register does with a byte written to it.
fn acpi_request(value: u8) -> Option<ExitRequest> {
    if value == ACPI_RESET_VALUE {
        Some(ExitRequest::Reset)
    } else if value & 0x20 != 0 && (value >> 2) & 7 == S5_SLEEP_TYPE {
        Some(ExitRequest::PowerOff)
    } else {
        None
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
        ACPI_SHUTDOWN_PORT.into(),
        ACPI_SHUTDOWN_PORT_SIZE,
        Arc::new(AcpiShutdown::new(Arc::clone(&exit))),
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

    let mut i8042 = I8042Model::new();
    let mut expected: Option<ExitRequest> = None;
    let mut booted = false;
    for op in input.ops.iter().take(512) {
        let port = match op.port % 4 {
            0 => 0x5e + u64::from(op.port / 4 % 10),
            1 => 0xf3 + u64::from(op.port / 4 % 4),
            2 => 0x5fe + u64::from(op.port / 4 % 4),
            _ => u64::from(op.port),
        };
        let width = usize::from(op.width % 5);
        let claimed = |base: u16, len: u64| {
            port >= u64::from(base) && port + width as u64 <= u64::from(base) + len
        };
        let delivered = matches!(width, 1 | 2 | 4);
        let i8042_offset = port.wrapping_sub(I8042_PORT.into());
        if op.kind % 2 == 0 {
            let result = bus.write(port, &vec![op.value; width]);
            if delivered && result.is_ok() {
                if claimed(I8042_PORT, I8042_PORT_SIZE) && i8042.write(i8042_offset, op.value) {
                    expected.get_or_insert(ExitRequest::Reset);
                }
                if port == u64::from(ACPI_SHUTDOWN_PORT) {
                    if let Some(request) = acpi_request(op.value) {
                        expected.get_or_insert(request);
                    }
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
            if delivered && result.is_ok() && claimed(I8042_PORT, I8042_PORT_SIZE) {
                let want = i8042.read(i8042_offset);
                assert_eq!(data[0], want, "i8042 read at {port:#x}; model {i8042:?}");
                assert!(
                    data[1..].iter().all(|&b| b == 0xff),
                    "i8042 wide read {data:?}"
                );
            }
            if delivered && result.is_ok() && claimed(ACPI_SHUTDOWN_PORT, ACPI_SHUTDOWN_PORT_SIZE) {
                assert_eq!(data, [0], "ACPI sleep status");
            }
        }
        assert_eq!(exit.requested(), expected, "after {op:?}");
        assert_eq!(boot.boot_time().is_some(), booted);
    }
}
