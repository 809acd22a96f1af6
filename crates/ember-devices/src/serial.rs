//! A 16550A UART (the PC serial port), built on [`vm_superio::Serial`], and its
//! snapshot state ([`SerialState`]).

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ember_bus::BusDevice;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, SerialEvents};

use crate::output::{Counters, OutputQueue, QueueWriter};
use crate::{DeviceError, IrqLine};

/// Base I/O port of COM1.
pub const COM1_PORT: u16 = ember_arch::layout::COM1_PORT;
/// The GSI (legacy IRQ line) COM1 interrupts on.
pub const COM1_GSI: u32 = ember_arch::layout::COM1_GSI;
/// Number of I/O ports a UART occupies.
pub const SERIAL_PORT_SIZE: u64 = ember_arch::layout::SERIAL_PORT_SIZE;

/// The size of the UART's input FIFO (vm-superio's): the most pending input a
/// [`SerialState`] may hold.
pub const SERIAL_FIFO_SIZE: usize = 64;

/// The size of the buffer between the guest and a background output
/// ([`SerialOutput::Stdout`], [`SerialOutput::File`], [`SerialOutput::Background`]) when
/// [`Serial::new`] makes it: 1 MiB, so that a reader that is merely slow loses nothing.
pub const DEFAULT_OUTPUT_BUFFER: usize = 1 << 20;

/// Where the bytes the guest transmits go.
///
/// [`Stdout`](Self::Stdout), [`File`](Self::File) and [`Background`](Self::Background)
/// are written by a thread of their own, behind a bounded buffer the vCPU fills without
/// ever blocking: a reader that stops reading costs the guest's output (the bytes that
/// do not fit are dropped and counted, [`SerialStats::bytes_dropped`]), never a stalled
/// vCPU. [`Writer`](Self::Writer) is called on the vCPU's thread, with the UART locked.
pub enum SerialOutput {
    /// The VMM's standard output (a duplicate of fd 1, so the writer thread never holds
    /// `std::io::stdout`'s lock), through the background writer.
    Stdout,
    /// A file, created or truncated by [`Serial::new`], through the background writer;
    /// an error if it cannot be opened.
    File {
        /// The file.
        path: PathBuf,
        /// At most this many bytes are written; the rest is discarded and counted
        /// ([`SerialStats::bytes_over_limit`]), with one warning. `None`: no limit.
        max_bytes: Option<u64>,
    },
    /// Any writer, on the background writer thread: it may block.
    Background(Box<dyn Write + Send>),
    /// Any writer, called directly for each byte on the vCPU thread (with the UART
    /// locked), so it must not block: a test buffer, say.
    Writer(Box<dyn Write + Send>),
    /// Discard the output.
    Sink,
}

impl fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Stdout => f.write_str("Stdout"),
            SerialOutput::File { path, max_bytes } => f
                .debug_struct("File")
                .field("path", path)
                .field("max_bytes", max_bytes)
                .finish(),
            SerialOutput::Background(_) => f.write_str("Background(..)"),
            SerialOutput::Writer(_) => f.write_str("Writer(..)"),
            SerialOutput::Sink => f.write_str("Sink"),
        }
    }
}

pub use crate::output::ThreadHook;

/// What [`SerialOutput::into_writer`] makes: the writer the UART calls and, for a
/// background output, the queue behind it.
type Output = (Box<dyn Write + Send>, Option<Arc<OutputQueue>>);

impl SerialOutput {
    fn into_writer(
        self,
        buffer: usize,
        counters: &Arc<Counters>,
        hook: Option<ThreadHook>,
    ) -> Result<Output, DeviceError> {
        let (out, limit, name): (Box<dyn Write + Send>, _, _) = match self {
            SerialOutput::Stdout => {
                let fd = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| DeviceError::DupStdout { source })?;
                (Box::new(File::from(fd)), None, "stdout".to_string())
            }
            SerialOutput::File { path, max_bytes } => match File::create(&path) {
                Ok(file) => {
                    let name = format!("output file {}", path.display());
                    (Box::new(file), max_bytes, name)
                }
                Err(source) => return Err(DeviceError::OpenSerialOutput { path, source }),
            },
            SerialOutput::Background(writer) => (writer, None, "output".to_string()),
            SerialOutput::Writer(writer) => return Ok((writer, None)),
            SerialOutput::Sink => return Ok((Box::new(io::sink()), None)),
        };
        let queue = OutputQueue::start(out, buffer, limit, name, Arc::clone(counters), hook)
            .map_err(|source| DeviceError::SpawnSerialOutput { source })?;
        Ok((Box::new(QueueWriter(Arc::clone(&queue))), Some(queue)))
    }
}

/// Counters of what happened to the bytes the guest transmitted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SerialStats {
    /// Bytes written to the output (for a background output: by its writer thread, so
    /// far).
    pub bytes_out: u64,
    /// Bytes lost because writing or flushing the output failed.
    pub bytes_lost: u64,
    /// Bytes dropped because a background output's buffer was full (its reader did not
    /// keep up), or after [`Serial::abandon_output`].
    pub bytes_dropped: u64,
    /// Bytes discarded past a file's size limit ([`SerialOutput::File`]'s `max_bytes`).
    pub bytes_over_limit: u64,
}

impl SerialEvents for Counters {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        if self.lost.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!(
                "serial: writing guest output failed; byte lost (further losses are only counted)"
            );
        }
    }

    fn in_buffer_empty(&self) {}
}

type Uart = vm_superio::Serial<IrqLine, Arc<Counters>, Box<dyn Write + Send>>;

/// The UART's state for a snapshot ([`Serial::save_state`], [`Serial::restore_state`]):
/// its registers and the input the guest has not read yet. A serde mirror of
/// [`vm_superio::serial::SerialState`], with `From` conversions both ways.
///
/// The output side (writer, background buffer and thread, statistics) is the VMM's
/// wiring, not state: output the guest already wrote is not in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte (DLL).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub baud_divisor_high: u8,
    /// Interrupt enable register (IER).
    pub interrupt_enable: u8,
    /// Interrupt identification register (IIR).
    pub interrupt_identification: u8,
    /// Line control register (LCR).
    pub line_control: u8,
    /// Line status register (LSR).
    pub line_status: u8,
    /// Modem control register (MCR).
    pub modem_control: u8,
    /// Modem status register (MSR).
    pub modem_status: u8,
    /// Scratch register (SCR).
    pub scratch: u8,
    /// Input the guest has not read yet, first byte first (at most
    /// [`SERIAL_FIFO_SIZE`]).
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    /// The power-on state.
    fn default() -> Self {
        vm_superio::serial::SerialState::default().into()
    }
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<SerialState> for vm_superio::serial::SerialState {
    fn from(s: SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// A 16550A UART on a PIO bus (usually at [`COM1_PORT`], interrupting on [`COM1_GSI`]).
///
/// Bus offsets `0..8` are the UART registers (RBR/THR, IER, IIR/FCR, LCR, MCR, LSR,
/// MSR, SCR). An access wider than one byte uses its first byte: a write sends
/// `data[0]` to the register at `offset`, a read puts the register in `data[0]` and
/// leaves the other bytes all ones. Offsets outside `0..8` are ignored.
///
/// The guest is never stalled by its output. Stdout and files are written by a thread
/// of their own behind a bounded buffer ([`SerialOutput`]); what does not fit is
/// dropped and counted ([`Serial::stats`]), with a warning when dropping starts. A
/// [`SerialOutput::Writer`] is written and flushed after every byte (vm-superio writes
/// and then flushes each byte); if it fails the byte is dropped and counted.
///
/// Before the VMM exits, [`Serial::flush_output`] waits for the buffered output to be
/// written, and [`Serial::abandon_output`] gives up on it (for a reader that never
/// reads). Dropping the UART waits for buffered output only while its writer makes
/// progress.
pub struct Serial {
    uart: Mutex<Uart>,
    counters: Arc<Counters>,
    /// The background output's queue, if it has one.
    queue: Option<Arc<OutputQueue>>,
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// Creates a UART sending guest output to `output` and raising interrupts on `irq`;
    /// a background output gets a buffer of [`DEFAULT_OUTPUT_BUFFER`] bytes.
    ///
    /// Fails if `output` is a file that cannot be created or truncated, stdout cannot
    /// be duplicated, or the writer thread cannot be started.
    pub fn new(output: SerialOutput, irq: IrqLine) -> Result<Self, DeviceError> {
        Self::with_buffer_size(output, irq, DEFAULT_OUTPUT_BUFFER)
    }

    /// [`Serial::new`] with a background output buffer of `buffer_bytes` bytes.
    pub fn with_buffer_size(
        output: SerialOutput,
        irq: IrqLine,
        buffer_bytes: usize,
    ) -> Result<Self, DeviceError> {
        Self::with_thread_hook(output, irq, buffer_bytes, None)
    }

    /// [`Serial::with_buffer_size`], and a background output's writer thread runs
    /// `hook` first, given its name (`serial-output`): where a VMM installs the
    /// thread's seccomp filter. If the hook fails, so does this.
    pub fn with_thread_hook(
        output: SerialOutput,
        irq: IrqLine,
        buffer_bytes: usize,
        hook: Option<ThreadHook>,
    ) -> Result<Self, DeviceError> {
        let counters = Arc::new(Counters::default());
        let (writer, queue) = output.into_writer(buffer_bytes, &counters, hook)?;
        let uart = vm_superio::Serial::with_events(irq, Arc::clone(&counters), writer);
        Ok(Serial {
            uart: Mutex::new(uart),
            counters,
            queue,
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
                ember_rate_limiter::warn_limited!(
                    "serial: input queued but raising the interrupt failed: {err}"
                );
                Ok(take)
            }
            Err(source) => Err(DeviceError::SerialInput {
                len: bytes.len(),
                source,
            }),
        }
    }

    /// The UART's registers and pending input, for a snapshot. Take it while the vCPUs
    /// are paused.
    ///
    /// ```
    /// use ember_bus::BusDevice;
    /// use ember_devices::{IrqLine, Serial, SerialOutput};
    ///
    /// let old = Serial::new(SerialOutput::Sink, IrqLine::new()?)?;
    /// old.write(7, &[0x5a]); // the scratch register
    /// old.enqueue_input(b"k")?;
    /// let new = Serial::new(SerialOutput::Sink, IrqLine::new()?)?;
    /// new.restore_state(&old.save_state())?;
    /// let mut byte = [0u8];
    /// new.read(7, &mut byte);
    /// assert_eq!(byte, [0x5a]);
    /// new.read(0, &mut byte);
    /// assert_eq!(byte, [b'k'], "the input the guest had not read");
    /// # Ok::<(), ember_devices::DeviceError>(())
    /// ```
    pub fn save_state(&self) -> SerialState {
        self.lock().state().into()
    }

    /// Restores registers and pending input from [`Serial::save_state`], keeping this
    /// UART's output (writer, buffer, thread) and statistics. As vm-superio's
    /// `Serial::from_state` does, the interrupt line is raised if the state has a
    /// THR-empty or received-data interrupt enabled and pending (16550 drivers read
    /// IIR, so a repeated interrupt is harmless).
    ///
    /// Fails, changing nothing, if the state holds more than [`SERIAL_FIFO_SIZE`]
    /// input bytes ([`DeviceError::SerialStateInput`]), if the interrupt line cannot
    /// be duplicated ([`DeviceError::EventFd`]) or raised
    /// ([`DeviceError::RestoreSerial`]).
    pub fn restore_state(&self, state: &SerialState) -> Result<(), DeviceError> {
        if state.in_buffer.len() > SERIAL_FIFO_SIZE {
            return Err(DeviceError::SerialStateInput {
                len: state.in_buffer.len(),
                max: SERIAL_FIFO_SIZE,
            });
        }
        let mut uart = self.lock();
        let irq = uart.interrupt_evt().try_clone()?;
        let placeholder: Box<dyn Write + Send> = Box::new(io::sink());
        let mut restored = vm_superio::Serial::from_state(
            &state.clone().into(),
            irq,
            Arc::clone(&self.counters),
            placeholder,
        )
        .map_err(|source| match source {
            UartError::FullFifo => DeviceError::SerialStateInput {
                len: state.in_buffer.len(),
                max: SERIAL_FIFO_SIZE,
            },
            source => DeviceError::RestoreSerial { source },
        })?;
        // The output stays this UART's.
        std::mem::swap(restored.writer_mut(), uart.writer_mut());
        *uart = restored;
        Ok(())
    }

    /// Free room in the input FIFO, in bytes.
    pub fn input_capacity(&self) -> usize {
        self.lock().fifo_capacity()
    }

    /// Counters of output bytes written, lost, dropped and discarded.
    pub fn stats(&self) -> SerialStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        SerialStats {
            bytes_out: match self.queue {
                Some(_) => load(&c.written),
                None => load(&c.accepted),
            },
            bytes_lost: load(&c.lost),
            bytes_dropped: load(&c.dropped),
            bytes_over_limit: load(&c.over_limit),
        }
    }

    /// Bytes of guest output buffered and not written yet (0 for an output with no
    /// background writer). Takes no lock the vCPUs or the writer hold for long.
    pub fn pending_output(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.pending())
    }

    /// Waits up to `timeout` for the buffered guest output to be written; returns
    /// whether all of it was (at once for an output with no background writer, and
    /// `false` at once after [`Serial::abandon_output`] while a write is still stuck).
    /// Call it once the vCPUs are stopped, before the VMM exits.
    pub fn flush_output(&self, timeout: Duration) -> bool {
        self.queue.as_ref().is_none_or(|q| q.flush(timeout))
    }

    /// Gives up on the buffered guest output: what is queued is dropped and counted
    /// ([`SerialStats::bytes_dropped`]), so are later bytes, and dropping the UART no
    /// longer waits. For a VMM that must exit now (SIGTERM) or whose reader stopped
    /// reading. The writer thread ends by itself after the write it may be stuck in.
    pub fn abandon_output(&self) {
        if let Some(queue) = &self.queue {
            queue.abandon();
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
            Err(err) => ember_rate_limiter::warn_limited!(
                "serial: write of {value:#04x} to register {reg}: {err}"
            ),
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
                ..SerialStats::default()
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
            SerialOutput::File {
                path: file.as_path().into(),
                max_bytes: None,
            },
            IrqLine::new().unwrap(),
        )
        .unwrap();
        let (bus, serial) = bus_with(serial);
        for &b in b"boot\n" {
            bus.write(THR, &[b]).unwrap();
        }
        assert!(serial.flush_output(Duration::from_secs(30)));
        assert_eq!(serial.stats().bytes_out, 5);
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
        let output = SerialOutput::File {
            path: path.clone(),
            max_bytes: None,
        };
        let err = Serial::new(output, IrqLine::new().unwrap()).unwrap_err();
        match &err {
            DeviceError::OpenSerialOutput { path: p, .. } => assert_eq!(p, &path),
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err
            .to_string()
            .contains("/nonexistent-ember-dir/serial.log"));
    }

    /// A writer stuck in its first write until the test drops the sender, like
    /// `write(2)` to a pipe nobody reads. It says when it is stuck on the third field.
    struct Stuck(
        std::sync::mpsc::Receiver<()>,
        SharedBuf,
        Option<std::sync::mpsc::Sender<()>>,
    );
    impl Write for Stuck {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if let Some(entered) = self.2.take() {
                let _ = entered.send(());
            }
            let _ = self.0.recv();
            self.1.write(data)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_never_blocks_the_guest() {
        let (release, stuck) = std::sync::mpsc::channel();
        let (entered, writer_stuck) = std::sync::mpsc::channel();
        let out = SharedBuf::default();
        let serial = Serial::with_buffer_size(
            SerialOutput::Background(Box::new(Stuck(stuck, out.clone(), Some(entered)))),
            IrqLine::new().unwrap(),
            64,
        )
        .unwrap();
        let (bus, serial) = bus_with(serial);
        let bus = Arc::new(bus);
        // The writer takes the first byte and is stuck writing it (so a byte is in
        // flight whatever the scheduler does)...
        bus.write(THR, b"a").unwrap();
        writer_stuck
            .recv_timeout(Duration::from_secs(60))
            .expect("the writer never started writing");
        // ...while the guest floods THR from a vCPU thread; with a blocking output this
        // thread would never finish.
        let vcpu_bus = Arc::clone(&bus);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 1..10_000u32 {
                vcpu_bus.write(THR, &[b'a' + (i % 26) as u8]).unwrap();
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("a vCPU blocked on serial output");
        // Everything past the buffer was dropped and counted.
        let stats = serial.stats();
        assert_eq!(stats.bytes_dropped, 10_000 - 64, "{stats:?}");
        assert_eq!(stats.bytes_out, 0);
        assert_eq!(serial.pending_output(), 64);
        // The UART itself still answers: input, status.
        assert_eq!(serial.enqueue_input(b"k").unwrap(), 1);
        assert_eq!(read_byte(&bus, RBR), b'k');
        assert!(!serial.flush_output(Duration::ZERO));

        // Giving up drops what is queued (the stuck write keeps its byte).
        serial.abandon_output();
        assert!(!serial.flush_output(Duration::from_secs(60)));
        assert_eq!(
            serial.stats().bytes_dropped + serial.pending_output() as u64,
            10_000
        );
        drop(release);
    }

    #[test]
    fn a_slow_output_loses_nothing_that_fits() {
        let (release, stuck) = std::sync::mpsc::channel();
        let out = SharedBuf::default();
        let serial = Serial::new(
            SerialOutput::Background(Box::new(Stuck(stuck, out.clone(), None))),
            IrqLine::new().unwrap(),
        )
        .unwrap();
        let (bus, serial) = bus_with(serial);
        let text: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for &b in &text {
            bus.write(THR, &[b]).unwrap();
        }
        drop(release);
        assert!(serial.flush_output(Duration::from_secs(60)));
        assert_eq!(out.contents(), text);
        assert_eq!(
            serial.stats(),
            SerialStats {
                bytes_out: 100_000,
                ..SerialStats::default()
            }
        );
    }

    #[test]
    fn file_output_stops_at_its_limit() {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let serial = Serial::new(
            SerialOutput::File {
                path: file.as_path().into(),
                max_bytes: Some(4),
            },
            IrqLine::new().unwrap(),
        )
        .unwrap();
        let (bus, serial) = bus_with(serial);
        for &b in b"hello world" {
            bus.write(THR, &[b]).unwrap();
        }
        assert!(serial.flush_output(Duration::from_secs(30)));
        assert_eq!(std::fs::read(file.as_path()).unwrap(), b"hell");
        let stats = serial.stats();
        assert_eq!(
            (stats.bytes_out, stats.bytes_over_limit),
            (4, 7),
            "{stats:?}"
        );
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
                bytes_lost: 2,
                ..SerialStats::default()
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
        let stdout = Serial::new(SerialOutput::Stdout, IrqLine::new().unwrap()).unwrap();
        assert!(stdout.flush_output(Duration::ZERO));
        assert_eq!(stdout.pending_output(), 0);
        assert_eq!(format!("{:?}", SerialOutput::Sink), "Sink");
    }

    #[test]
    fn fifo_size_matches_vm_superio() {
        let serial = Serial::new(SerialOutput::Sink, IrqLine::new().unwrap()).unwrap();
        assert_eq!(serial.input_capacity(), SERIAL_FIFO_SIZE);
        // vm-superio itself refuses one byte more.
        let state = vm_superio::serial::SerialState {
            in_buffer: vec![0; SERIAL_FIFO_SIZE + 1],
            ..Default::default()
        };
        let uart = vm_superio::Serial::from_state(
            &state,
            IrqLine::new().unwrap(),
            vm_superio::serial::NoEvents,
            io::sink(),
        );
        assert!(matches!(uart, Err(UartError::FullFifo)));
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
