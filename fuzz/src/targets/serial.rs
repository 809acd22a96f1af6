//! The 16550A UART ([`ember_devices::Serial`]) under random register sequences: reads
//! and writes of any width at any offset (divisor latch, loopback, FIFO control,
//! interrupt enables...), host input of any size, and an output that may fail.
//!
//! Checked: input is accepted only up to the room announced, and every byte the guest
//! transmits is counted exactly once, as written or lost.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use ember_bus::BusDevice;
use ember_devices::{IrqLine, Serial, SerialOutput};

use crate::{decode, input_struct};

input_struct! {
    /// `output % 4`: 0 an output that fails every `fail_every`-th write, 1-3 one that
    /// never fails. Then the operations.
    pub struct SerialInput {
        pub output: u8,
        pub fail_every: u8,
        pub ops: Vec<SerialOp>,
    }
}

input_struct! {
    /// `kind % 4`: 0-1 write `value` at `offset`, 2 read, 3 offer `input` as host
    /// input. Offsets are `offset % 10` (two past the UART), or any value when
    /// `offset >= 250`; `width % 5` bytes are passed (0 to 4).
    pub struct SerialOp {
        pub kind: u8,
        pub offset: u8,
        pub width: u8,
        pub value: u8,
        pub input: Vec<u8>,
    }
}

/// Records output; fails some writes.
#[derive(Clone)]
struct Out {
    bytes: Arc<Mutex<Vec<u8>>>,
    calls: Arc<Mutex<u64>>,
    fail_every: u64,
}

impl Write for Out {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut calls = self.calls.lock().unwrap();
        *calls += 1;
        if self.fail_every != 0 && (*calls).is_multiple_of(self.fail_every) {
            return Err(io::Error::from_raw_os_error(libc::EPIPE));
        }
        self.bytes.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<SerialInput>(data) else {
        return;
    };
    let out = Out {
        bytes: Arc::default(),
        calls: Arc::default(),
        fail_every: if input.output % 4 == 0 {
            u64::from(input.fail_every % 4) + 1
        } else {
            0
        },
    };
    let irq = IrqLine::new().expect("eventfd");
    let serial = Serial::new(SerialOutput::Writer(Box::new(out.clone())), irq).expect("serial");
    for op in input.ops.iter().take(512) {
        let offset = if op.offset >= 250 {
            u64::from(op.offset) << (op.value % 64)
        } else {
            u64::from(op.offset % 10)
        };
        let width = usize::from(op.width % 5);
        match op.kind % 4 {
            0 | 1 => serial.write(offset, &vec![op.value; width]),
            2 => {
                let mut data = vec![0xffu8; width];
                serial.read(offset, &mut data);
                if width > 1 {
                    assert!(data[1..].iter().all(|&b| b == 0xff), "wide read: {data:?}");
                }
            }
            _ => {
                let room = serial.input_capacity();
                let taken = serial.enqueue_input(&op.input).expect("enqueue");
                assert!(
                    taken <= op.input.len() && taken <= room,
                    "{taken} of {} ({room} room)",
                    op.input.len()
                );
            }
        }
        let stats = serial.stats();
        assert_eq!(
            stats.bytes_out,
            out.bytes.lock().unwrap().len() as u64,
            "bytes counted vs written"
        );
    }
}
