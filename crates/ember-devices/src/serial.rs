//! A 16550A UART (the PC serial port), built on [`vm_superio::Serial`].

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ember_bus::BusDevice;
use vm_superio::serial::{Error as UartError, SerialEvents};

use crate::{DeviceError, IrqLine};

/// Base I/O port of COM1.
pub const COM1_PORT: u16 = ember_arch::layout::COM1_PORT;
/// The GSI (legacy IRQ line) COM1 interrupts on.
pub const COM1_GSI: u32 = ember_arch::layout::COM1_GSI;
/// Number of I/O ports a UART occupies.
pub const SERIAL_PORT_SIZE: u64 = ember_arch::layout::SERIAL_PORT_SIZE;

/// Where the bytes the guest transmits go.
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated by [`Serial::new`]; an error if it cannot be opened.
    File(PathBuf),
    /// Any writer, for example a pipe or a test buffer.
    Writer(Box<dyn Write + Send>),
    /// Discard the output.
    Sink,
}

impl fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdout => f.write_str("Stdout"),
            SerialOutput::File(path) => f.debug_tuple("File").field(path).finish(),
            SerialOutput::Writer(_) => f.write_str("Writer(..)"),
            SerialOutput::Sink => f.write_str("Sink"),
        }
    }
}

impl SerialOutput {
    fn into_writer(self) -> Result<Box<dyn Write + Send>, DeviceError> {
        Ok(match self {
            SerialOutput::Stdout => Box::new(io::stdout()),
            SerialOutput::File(path) => match File::create(&path) {
                Ok(file) => Box::new(file),
                Err(source) => return Err(DeviceError::OpenSerialOutput { path, source }),
            },
            SerialOutput::Writer(writer) => writer,
            SerialOutput::Sink => Box::new(io::sink()),
        })
    }
}

/// Counters of what happened to the bytes the guest transmitted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SerialStats {
    /// Bytes written and flushed to the output.
    pub bytes_out: u64,
    /// Bytes lost because writing or flushing the output failed.
    pub bytes_lost: u64,
}

/// `SerialEvents` backend: counts output bytes and logs the first lost one.
#[derive(Debug, Default)]
struct Counters {
    bytes_out: AtomicU64,
    bytes_lost: AtomicU64,
}

impl SerialEvents for Counters {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.bytes_out.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        if self.bytes_lost.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!(
                "serial: writing guest output failed; byte lost (further losses are only counted)"
            );
        }
    }

    fn in_buffer_empty(&self) {}
}

type Uart = vm_superio::Serial<IrqLine, Arc<Counters>, Box<dyn Write + Send>>;

/// A 16550A UART on a PIO bus (usually at [`COM1_PORT`], interrupting on [`COM1_GSI`]).
///
/// Bus offsets `0..8` are the UART registers (RBR/THR, IER, IIR/FCR, LCR, MCR, LSR,
/// MSR, SCR). An access wider than one byte uses its first byte: a write sends
/// `data[0]` to the register at `offset`, a read puts the register in `data[0]` and
/// leaves the other bytes all ones. Offsets outside `0..8` are ignored.
///
/// Output is flushed after every byte the guest transmits (vm-superio writes and then
/// flushes each byte), so a guest crash or a VMM abort loses nothing already sent.
/// If the output fails the byte is dropped and counted ([`Serial::stats`]); the guest
/// is never stalled.
pub struct Serial {
    uart: Mutex<Uart>,
    counters: Arc<Counters>,
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// Creates a UART sending guest output to `output` and raising interrupts on `irq`.
    ///
    /// Fails only if `output` is a file that cannot be created or truncated.
    pub fn new(output: SerialOutput, irq: IrqLine) -> Result<Self, DeviceError> {
        let writer = output.into_writer()?;
        let counters = Arc::new(Counters::default());
        let uart = vm_superio::Serial::with_events(irq, Arc::clone(&counters), writer);
        Ok(Serial {
            uart: Mutex::new(uart),
            counters,
        })
    }

    /// Queues host input (for example from stdin) for the guest to read through RBR,
    /// raising the receive interrupt if the guest enabled it.
    ///
    /// Returns how many bytes were accepted: when the FIFO has less room than
    /// `bytes.len()`, only what fits is taken (possibly 0); offer the rest later. While
    /// the guest has the UART in loopback mode no input is accepted.
    ///
    /// If the interrupt cannot be raised the bytes are still queued (the guest can poll
    /// LSR); the failure is logged.
    pub fn enqueue_input(&self, bytes: &[u8]) -> Result<usize, DeviceError> {
        let mut uart = self.lock();
        let take = uart.fifo_capacity().min(bytes.len());
        let Some(chunk) = bytes.get(..take) else {
            return Ok(0);
        };
        if chunk.is_empty() {
            return Ok(0);
        }
        match uart.enqueue_raw_bytes(chunk) {
            Ok(accepted) => Ok(accepted),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(err)) => {
                log::warn!("serial: input queued but raising the interrupt failed: {err}");
                Ok(take)
            }
            Err(source) => Err(DeviceError::SerialInput {
                len: bytes.len(),
                source,
            }),
        }
    }

    /// Free room in the input FIFO, in bytes.
    pub fn input_capacity(&self) -> usize {
        self.lock().fifo_capacity()
    }

    /// Counters of output bytes written and lost.
    pub fn stats(&self) -> SerialStats {
        SerialStats {
            bytes_out: self.counters.bytes_out.load(Ordering::Relaxed),
            bytes_lost: self.counters.bytes_lost.load(Ordering::Relaxed),
        }
    }

    /// Locks the UART, recovering it if a previous holder panicked (for example a
    /// caller-supplied writer): its registers are still consistent byte-sized values.
    fn lock(&self) -> MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Maps a bus offset to a UART register number, if it is one.
fn register(offset: u64) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|&reg| u64::from(reg) < SERIAL_PORT_SIZE)
}

impl BusDevice for Serial {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let Some(reg) = register(offset) else {
            return;
        };
        if let Some(first) = data.first_mut() {
            *first = self.lock().read(reg);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (Some(reg), Some(&value)) = (register(offset), data.first()) else {
            return;
        };
        match self.lock().write(reg, value) {
            Ok(()) => {}
            // Already counted (and logged once) by `Counters::tx_lost_byte`.
            Err(UartError::IOError(_)) => {}
            Err(err) => log::warn!("serial: write of {value:#04x} to register {reg}: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fuzz_device, SharedBuf};
    use ember_bus::{Bus, BusKind};
    use std::io::Read;

    const COM1: u64 = COM1_PORT as u64;
    const THR: u64 = COM1;
    const RBR: u64 = COM1;
    const IER: u64 = COM1 + 1;
    const IIR: u64 = COM1 + 2;
    const LSR: u64 = COM1 + 5;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;
    const LSR_IDLE: u8 = 0x40;

    fn bus_with(serial: Serial) -> (Bus, Arc<Serial>) {
        let bus = Bus::new(BusKind::Pio);
        let serial = Arc::new(serial);
        bus.insert(COM1, SERIAL_PORT_SIZE, serial.clone()).unwrap();
        (bus, serial)
    }

    fn buffered() -> (Bus, Arc<Serial>, SharedBuf, IrqLine) {
        let buf = SharedBuf::default();
        let irq = IrqLine::new().unwrap();
        let irq_view = irq.try_clone().unwrap();
        let serial = Serial::new(SerialOutput::Writer(Box::new(buf.clone())), irq).unwrap();
        let (bus, serial) = bus_with(serial);
        (bus, serial, buf, irq_view)
    }

    fn read_byte(bus: &Bus, addr: u64) -> u8 {
        let mut byte = [0u8];
        bus.read(addr, &mut byte).unwrap();
        byte[0]
    }

    #[test]
    fn output_bytes_reach_the_writer() {
        let (bus, serial, buf, _irq) = buffered();
        for &b in b"hello\n" {
            bus.write(THR, &[b]).unwrap();
        }
        assert_eq!(buf.contents(), b"hello\n");
        assert_eq!(
            serial.stats(),
            SerialStats {
                bytes_out: 6,
                bytes_lost: 0
            }
        );
    }

    #[test]
    fn output_is_flushed_after_every_byte() {
        let (bus, _serial, buf, _irq) = buffered();
        for &b in b"abc" {
            bus.write(THR, &[b]).unwrap();
        }
        assert_eq!(buf.flushes(), 3);
    }

    #[test]
    fn thr_write_triggers_irq_only_when_enabled() {
        let (bus, _serial, _buf, irq) = buffered();
        bus.write(THR, b"x").unwrap();
        assert!(irq.event_fd().read().is_err(), "IER is 0: no interrupt");

        // Enable the THR-empty interrupt. THR is always empty, so it fires at once.
        bus.write(IER, &[0x02]).unwrap();
        assert_eq!(irq.event_fd().read().unwrap(), 1);
        // Reading IIR acknowledges it (0x02 = THR empty, FIFO bits set).
        assert_eq!(read_byte(&bus, IIR), 0xc2);

        bus.write(THR, b"y").unwrap();
        assert_eq!(irq.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn lsr_shows_thr_empty() {
        let (bus, _serial, _buf, _irq) = buffered();
        let lsr = read_byte(&bus, LSR);
        assert_eq!(lsr & (LSR_THR_EMPTY | LSR_IDLE), LSR_THR_EMPTY | LSR_IDLE);
        assert_eq!(lsr & LSR_DATA_READY, 0);
        bus.write(THR, b"z").unwrap();
        assert_ne!(read_byte(&bus, LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn input_is_read_back_through_rbr() {
        let (bus, serial, _buf, irq) = buffered();
        bus.write(IER, &[0x01]).unwrap(); // receive-data interrupt
        assert_eq!(serial.enqueue_input(b"ok").unwrap(), 2);
        assert_eq!(irq.event_fd().read().unwrap(), 1);

        assert_ne!(read_byte(&bus, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_byte(&bus, RBR), b'o');
        assert_ne!(read_byte(&bus, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_byte(&bus, RBR), b'k');
        assert_eq!(read_byte(&bus, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_beyond_fifo_capacity_is_partially_accepted() {
        let (bus, serial, _buf, _irq) = buffered();
        let capacity = serial.input_capacity();
        assert!(capacity > 0);
        let input: Vec<u8> = (0..capacity + 10).map(|i| i as u8).collect();

        assert_eq!(serial.enqueue_input(&input).unwrap(), capacity);
        assert_eq!(serial.input_capacity(), 0);
        assert_eq!(serial.enqueue_input(b"more").unwrap(), 0);
        assert_eq!(serial.enqueue_input(b"").unwrap(), 0);

        let read: Vec<u8> = (0..capacity).map(|_| read_byte(&bus, RBR)).collect();
        assert_eq!(read, input[..capacity]);
        assert_eq!(serial.input_capacity(), capacity);
        assert_eq!(read_byte(&bus, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn wide_accesses_use_the_first_byte() {
        let (bus, _serial, buf, _irq) = buffered();
        bus.write(THR, b"wxyz").unwrap();
        bus.write(THR, &[b'!', 0]).unwrap();
        assert_eq!(buf.contents(), b"w!");

        let mut data = [0u8; 2];
        bus.read(LSR, &mut data).unwrap();
        assert_eq!(data[0] & LSR_THR_EMPTY, LSR_THR_EMPTY);
        assert_eq!(data[1], 0xff);
    }

    #[test]
    fn offsets_outside_the_registers_are_ignored() {
        let (_bus, serial, buf, _irq) = buffered();
        serial.write(8, b"a");
        serial.write(u64::MAX, b"a");
        serial.write(0, &[]);
        let mut data = [0xffu8; 1];
        serial.read(8, &mut data);
        serial.read(0, &mut []);
        assert_eq!(data, [0xff]);
        assert!(buf.contents().is_empty());
    }

    #[test]
    fn file_output_is_written() {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(file.as_path(), b"old contents").unwrap();
        let serial = Serial::new(
            SerialOutput::File(file.as_path().into()),
            IrqLine::new().unwrap(),
        )
        .unwrap();
        let (bus, _serial) = bus_with(serial);
        for &b in b"boot\n" {
            bus.write(THR, &[b]).unwrap();
        }
        let mut contents = String::new();
        File::open(file.as_path())
            .unwrap()
            .read_to_string(&mut contents)
            .unwrap();
        assert_eq!(contents, "boot\n");
    }

    #[test]
    fn bad_file_path_is_an_error() {
        let path = PathBuf::from("/nonexistent-ember-dir/serial.log");
        let err =
            Serial::new(SerialOutput::File(path.clone()), IrqLine::new().unwrap()).unwrap_err();
        match &err {
            DeviceError::OpenSerialOutput { path: p, .. } => assert_eq!(p, &path),
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err
            .to_string()
            .contains("/nonexistent-ember-dir/serial.log"));
    }

    /// A writer that always fails: bytes are counted as lost, the guest carries on.
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("broken"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failing_output_counts_lost_bytes() {
        let serial = Serial::new(
            SerialOutput::Writer(Box::new(Broken)),
            IrqLine::new().unwrap(),
        )
        .unwrap();
        let (bus, serial) = bus_with(serial);
        bus.write(THR, b"a").unwrap();
        bus.write(THR, b"b").unwrap();
        assert_eq!(
            serial.stats(),
            SerialStats {
                bytes_out: 0,
                bytes_lost: 2
            }
        );
    }

    /// Panics on its first write, then works.
    struct PanicsOnce(bool, SharedBuf);
    impl Write for PanicsOnce {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if !self.0 {
                self.0 = true;
                panic!("writer panicked");
            }
            self.1.write(data)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn poisoned_lock_is_recovered() {
        let buf = SharedBuf::default();
        let writer = PanicsOnce(false, buf.clone());
        let serial = Serial::new(
            SerialOutput::Writer(Box::new(writer)),
            IrqLine::new().unwrap(),
        )
        .unwrap();
        let (bus, serial) = bus_with(serial);
        let bus = Arc::new(bus);
        let bus2 = Arc::clone(&bus);
        assert!(std::thread::spawn(move || bus2.write(THR, b"a"))
            .join()
            .is_err());
        assert!(serial.uart.is_poisoned());

        bus.write(THR, b"b").unwrap();
        assert_eq!(buf.contents(), b"b");
        assert_eq!(serial.enqueue_input(b"i").unwrap(), 1);
        assert_eq!(read_byte(&bus, RBR), b'i');
    }

    #[test]
    fn sink_and_stdout_outputs_construct() {
        assert!(Serial::new(SerialOutput::Sink, IrqLine::new().unwrap()).is_ok());
        assert!(Serial::new(SerialOutput::Stdout, IrqLine::new().unwrap()).is_ok());
        assert_eq!(format!("{:?}", SerialOutput::Sink), "Sink");
    }

    #[test]
    fn survives_random_accesses() {
        let serial = Serial::new(SerialOutput::Sink, IrqLine::new().unwrap()).unwrap();
        let serial = Arc::new(serial);
        fuzz_device(serial.clone(), COM1, SERIAL_PORT_SIZE, 0x5e41a1);
        // Still works afterwards (leave DLAB and loopback first).
        serial.write(3, &[0x03]);
        serial.write(4, &[0x08]);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & LSR_THR_EMPTY, 0);
    }
}
