//! Snapshot state of the serial port and the i8042: saved, written through an
//! `ember-snapshot` container as a VMM does, restored into freshly built devices, and
//! checked through what the guest sees on the bus.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use ember_bus::{Bus, BusKind};
use ember_devices::*;

const COM1: u64 = COM1_PORT as u64;
const RBR: u64 = COM1; // THR on write, DLL with DLAB
const IER: u64 = COM1 + 1; // DLM with DLAB
const LCR: u64 = COM1 + 3;
const MCR: u64 = COM1 + 4;
const LSR: u64 = COM1 + 5;
const SCR: u64 = COM1 + 7;
const LSR_DATA_READY: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;

const DATA: u64 = 0x60;
const CMD: u64 = 0x64;

/// The snapshot's format version in these tests.
const VERSION: u32 = 1;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);
impl Write for Buf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl Buf {
    fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// A serial port on a PIO bus; the handles the test keeps: its output and its IRQ.
fn serial_on_bus() -> (Bus, Arc<Serial>, Buf, IrqLine) {
    let out = Buf::default();
    let irq = IrqLine::new().unwrap();
    let irq_view = irq.try_clone().unwrap();
    let serial = Arc::new(Serial::new(SerialOutput::Writer(Box::new(out.clone())), irq).unwrap());
    let bus = Bus::new(BusKind::Pio);
    bus.insert(COM1, SERIAL_PORT_SIZE, serial.clone()).unwrap();
    (bus, serial, out, irq_view)
}

fn read(bus: &Bus, port: u64) -> u8 {
    let mut byte = [0xaa];
    bus.read(port, &mut byte).unwrap();
    byte[0]
}

/// Through a state file's bytes, as the VMM does.
fn through_container<T>(state: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = ember_snapshot::encode(VERSION, state).unwrap();
    ember_snapshot::decode(&bytes, VERSION).unwrap()
}

#[test]
fn serial_round_trip_keeps_registers_and_pending_input() {
    let (bus, old, old_out, old_irq) = serial_on_bus();
    // The guest programs the UART: divisor 0x010c, 8 data bits with parity, modem
    // lines, scratch, and the received-data interrupt.
    bus.write(LCR, &[LCR_DLAB]).unwrap();
    bus.write(RBR, &[0x0c]).unwrap();
    bus.write(IER, &[0x01]).unwrap();
    bus.write(LCR, &[0x1b]).unwrap();
    bus.write(MCR, &[0x0b]).unwrap();
    bus.write(SCR, &[0x77]).unwrap();
    bus.write(IER, &[0x01]).unwrap();
    bus.write(RBR, b"o").unwrap();
    assert_eq!(old_out.contents(), b"o");
    // Input arrives; the guest reads one byte of it before the snapshot.
    assert_eq!(old.enqueue_input(b"xyz").unwrap(), 3);
    assert_eq!(read(&bus, RBR), b'x');
    while old_irq.event_fd().read().is_ok() {}

    let saved = old.save_state();
    assert_eq!(saved.in_buffer, b"yz");
    assert_eq!(saved.line_control, 0x1b);
    let saved = through_container(&saved);

    // A new process: a fresh UART with its own output and line.
    let (bus, new, new_out, new_irq) = serial_on_bus();
    new.restore_state(&saved).unwrap();
    assert_eq!(new.save_state(), saved);
    // The guest's read acknowledged the received-data interrupt (vm-superio clears
    // IIR's RDA bit on every RBR read): nothing to raise again.
    assert!(new_irq.event_fd().read().is_err());

    assert_ne!(
        read(&bus, LSR) & LSR_DATA_READY,
        0,
        "pending input shows in LSR"
    );
    assert_eq!(read(&bus, IER), 0x01);
    assert_eq!(read(&bus, LCR), 0x1b);
    assert_eq!(read(&bus, MCR), 0x0b);
    assert_eq!(read(&bus, SCR), 0x77);
    bus.write(LCR, &[0x1b | LCR_DLAB]).unwrap();
    assert_eq!((read(&bus, RBR), read(&bus, IER)), (0x0c, 0x01), "divisor");
    bus.write(LCR, &[0x1b]).unwrap();

    // The guest reads on where it stopped.
    assert_eq!(read(&bus, RBR), b'y');
    assert_eq!(read(&bus, RBR), b'z');
    assert_eq!(read(&bus, LSR) & LSR_DATA_READY, 0);
    assert_eq!(new.input_capacity(), SERIAL_FIFO_SIZE);

    // Output goes to the new UART's writer; the old one gets nothing more.
    bus.write(RBR, b"p").unwrap();
    assert_eq!(new_out.contents(), b"p");
    assert_eq!(old_out.contents(), b"o");
    assert_eq!(new.stats().bytes_out, 1);
}

#[test]
fn serial_restore_raises_a_pending_interrupt() {
    let (bus, old, _out, _irq) = serial_on_bus();
    bus.write(IER, &[0x01]).unwrap();
    assert_eq!(old.enqueue_input(b"q").unwrap(), 1);
    // The snapshot is taken before the guest took the interrupt.
    let saved = through_container(&old.save_state());

    let (bus, new, _out, new_irq) = serial_on_bus();
    assert!(new_irq.event_fd().read().is_err());
    new.restore_state(&saved).unwrap();
    assert_eq!(new_irq.event_fd().read().unwrap(), 1);
    // IIR: received data available (0x04, FIFO bits set).
    assert_eq!(read(&bus, COM1 + 2), 0xc4);
    assert_eq!(read(&bus, RBR), b'q');
}

#[test]
fn serial_state_converts_both_ways() {
    let superio = vm_superio::serial::SerialState {
        baud_divisor_low: 1,
        baud_divisor_high: 2,
        interrupt_enable: 3,
        interrupt_identification: 4,
        line_control: 5,
        line_status: 6,
        modem_control: 7,
        modem_status: 8,
        scratch: 9,
        in_buffer: vec![10, 11],
    };
    let ours = SerialState::from(superio.clone());
    assert_eq!(ours.scratch, 9);
    assert_eq!(ours.in_buffer, [10, 11]);
    assert_eq!(vm_superio::serial::SerialState::from(ours), superio);
    assert_eq!(
        vm_superio::serial::SerialState::from(SerialState::default()),
        vm_superio::serial::SerialState::default()
    );
}

#[test]
fn serial_restore_refuses_an_overfull_fifo_and_changes_nothing() {
    let (bus, serial, _out, _irq) = serial_on_bus();
    bus.write(SCR, &[0x42]).unwrap();
    let state = SerialState {
        in_buffer: vec![b'a'; SERIAL_FIFO_SIZE + 1],
        ..SerialState::default()
    };
    match serial.restore_state(&state).unwrap_err() {
        DeviceError::SerialStateInput { len, max } => {
            assert_eq!((len, max), (SERIAL_FIFO_SIZE + 1, SERIAL_FIFO_SIZE))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(read(&bus, SCR), 0x42);
    assert_eq!(read(&bus, LSR) & LSR_DATA_READY, 0);
    // A full FIFO is fine.
    let state = SerialState {
        in_buffer: vec![b'a'; SERIAL_FIFO_SIZE],
        ..SerialState::default()
    };
    serial.restore_state(&state).unwrap();
    assert_eq!(serial.input_capacity(), 0);
}

fn i8042_on_bus(irq: Option<IrqLine>) -> (Bus, Arc<I8042>) {
    let exit = Arc::new(ExitSignal::new().unwrap());
    let dev = Arc::new(match irq {
        Some(irq) => I8042::with_keyboard_irq(exit, irq).unwrap(),
        None => I8042::new(exit).unwrap(),
    });
    let bus = Bus::new(BusKind::Pio);
    bus.insert(I8042_PORT.into(), I8042_PORT_SIZE, dev.clone())
        .unwrap();
    (bus, dev)
}

#[test]
fn i8042_round_trip() {
    let (bus, old) = i8042_on_bus(None);
    // CTR 0x47 (keyboard interrupt, translation), output port 0xdd.
    bus.write(CMD, &[0x60]).unwrap();
    bus.write(DATA, &[0x47]).unwrap();
    bus.write(CMD, &[0xd1]).unwrap();
    bus.write(DATA, &[0xdd]).unwrap();
    // Keys queued, the first read; then a CTR write half done.
    old.trigger_ctrl_alt_del().unwrap();
    assert_eq!(read(&bus, DATA), 0x1d);
    bus.write(CMD, &[0x60]).unwrap();

    let saved = through_container(&old.save_state());
    assert_eq!(
        saved,
        I8042State {
            ctr: 0x47,
            output_port: 0xdd,
            output: vec![0x38, 0xe0, 0x53],
            pending_command: Some(0x60),
            last_was_command: true,
        }
    );

    let irq = IrqLine::new().unwrap();
    let (bus, new) = i8042_on_bus(Some(irq.try_clone().unwrap()));
    new.restore_state(&saved).unwrap();
    assert_eq!(new.save_state(), saved);
    assert!(irq.event_fd().read().is_err(), "restore raises nothing");
    // Status: output full, system flag, last write a command, key lock open.
    assert_eq!(read(&bus, CMD), 0x1d);
    // The pending command takes its parameter.
    bus.write(DATA, &[0x45]).unwrap();
    assert_eq!(read(&bus, CMD) & 0x08, 0);
    // The keys the guest had not read yet.
    assert_eq!(read(&bus, DATA), 0x38);
    assert_eq!(read(&bus, DATA), 0xe0);
    assert_eq!(read(&bus, DATA), 0x53);
    assert_eq!(read(&bus, CMD) & 0x01, 0);
    bus.write(CMD, &[0x20]).unwrap();
    assert_eq!(read(&bus, DATA), 0x45, "CTR");
    bus.write(CMD, &[0xd0]).unwrap();
    assert_eq!(read(&bus, DATA), 0xdd, "output port");
}

#[test]
fn i8042_restore_refuses_impossible_states_and_changes_nothing() {
    let (bus, dev) = i8042_on_bus(None);
    let good = dev.save_state();
    let too_much = I8042State {
        output: vec![0; I8042_OUTPUT_BUFFER_SIZE + 1],
        ..good.clone()
    };
    assert!(matches!(
        dev.restore_state(&too_much),
        Err(DeviceError::I8042StateOutput { len: 17, max: 16 })
    ));
    let bad_command = I8042State {
        pending_command: Some(0x20),
        ..good.clone()
    };
    let err = dev.restore_state(&bad_command).unwrap_err();
    assert!(
        matches!(err, DeviceError::I8042StatePendingCommand { command: 0x20 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("0x20"));
    assert_eq!(dev.save_state(), good);
    assert_eq!(read(&bus, CMD), 0x14);
}
