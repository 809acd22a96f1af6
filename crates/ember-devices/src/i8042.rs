//! A minimal i8042 PS/2 controller: the CPU-reset command, and the controller commands
//! Linux's i8042 driver sends while it probes, answered at once.
//!
//! Linux probes the controller at boot (`i8042_controller_check`,
//! `i8042_controller_init`, `i8042_check_aux`): it reads and writes the controller
//! configuration byte (CTR, commands `0x20` and `0x60`) and looks for an AUX (mouse) port
//! (`0xD3` loop test, `0xA9` interface test, `0xA7`/`0xA8`). Every answer it waits for
//! comes by polling the status register for "output buffer full", and a command that
//! is never answered costs a timeout of 10,000 polls 50 us apart, which under an
//! emulated guest CPU takes minutes. This controller answers each of those commands
//! synchronously, and says there is no AUX port, so Linux sets up the keyboard port
//! only and finishes the probe without a timeout.
//!
//! The VMM can press Ctrl+Alt+Del ([`I8042::trigger_ctrl_alt_del`], Firecracker's
//! `SendCtrlAltDel`), and save and restore the controller ([`I8042State`]).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use ember_bus::BusDevice;
use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use crate::{DeviceError, ExitRequest, ExitSignal, IrqLine};

/// First I/O port of the i8042 (the data port).
pub const I8042_PORT: u16 = ember_arch::layout::I8042_PORT;
/// Number of ports claimed: `0x60` (data) through `0x64` (command/status).
///
/// Ports `0x61..=0x63` in between are not i8042 registers; port `0x61` (system control
/// port B) is handled inside KVM when the PIT is created with `KVM_PIT_SPEAKER_DUMMY`
/// (see `ember_vm::create_irqchip_and_pit`).
pub const I8042_PORT_SIZE: u64 = ember_arch::layout::I8042_PORT_SIZE;
/// The GSI (legacy IRQ 1) the keyboard interrupts on, for [`I8042::with_keyboard_irq`].
pub const I8042_KEYBOARD_GSI: u32 = ember_arch::layout::I8042_KEYBOARD_GSI;
/// How many bytes the output buffer holds (keyboard data waiting on port `0x60`), as in
/// Firecracker's i8042.
pub const I8042_OUTPUT_BUFFER_SIZE: usize = 16;

/// Bus offset of the data register (port `0x60`).
const DATA_OFFSET: u64 = 0;
/// Bus offset of the command/status register (port `0x64`).
const COMMAND_OFFSET: u64 = 4;

// Controller commands (written to port 0x64).
/// Read the CTR (byte 0 of the controller's RAM).
const CMD_READ_CTR: u8 = 0x20;
/// Write the CTR: the next byte on port 0x60.
const CMD_WRITE_CTR: u8 = 0x60;
/// Disable the AUX port.
const CMD_AUX_DISABLE: u8 = 0xa7;
/// Enable the AUX port.
const CMD_AUX_ENABLE: u8 = 0xa8;
/// Test the AUX interface: 0 means it works.
const CMD_AUX_TEST: u8 = 0xa9;
/// Controller self-test: [`SELF_TEST_OK`] means it passed.
const CMD_SELF_TEST: u8 = 0xaa;
/// Test the keyboard interface: 0 means it works.
const CMD_KBD_TEST: u8 = 0xab;
/// Disable the keyboard port.
const CMD_KBD_DISABLE: u8 = 0xad;
/// Enable the keyboard port.
const CMD_KBD_ENABLE: u8 = 0xae;
/// Read the output port.
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
/// Write the output port: the next byte on port 0x60.
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// Put the next byte on port 0x60 in the output buffer, as if from the keyboard.
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
/// Put the next byte on port 0x60 in the output buffer, as if from the AUX device
/// (Linux's AUX loop test).
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
/// Send the next byte on port 0x60 to the AUX device.
const CMD_WRITE_AUX: u8 = 0xd4;
/// Pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The self-test's success answer.
const SELF_TEST_OK: u8 = 0x55;
/// The AUX interface test's answer: 2, "clock line stuck high", an error, since there
/// is no AUX port (Linux takes any answer but 0x00, 0xFA and 0xFF as no AUX port).
const AUX_TEST_NO_PORT: u8 = 0x02;
/// The keyboard interface test's answer: no error.
const KBD_TEST_OK: u8 = 0x00;

// Status register bits (port 0x64).
/// Output buffer full: a byte waits on port 0x60.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// System flag: the controller passed its power-on self-test.
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
/// The last byte written went to the command port (not the data port).
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
/// Keyboard not inhibited by the key lock (Linux warns "Keylock active" without it).
const STATUS_UNLOCKED: u8 = 1 << 4;

// CTR bits.
/// Keyboard interrupt enabled: keyboard data raises IRQ 1.
const CTR_KBD_INT: u8 = 1 << 0;
/// System flag, as in the status register.
const CTR_SYSTEM_FLAG: u8 = 1 << 2;
/// Keyboard port disabled.
const CTR_KBD_DISABLED: u8 = 1 << 4;
/// AUX port disabled (its clock held low).
const CTR_AUX_DISABLED: u8 = 1 << 5;
/// Translate keyboard scan codes to set 1.
const CTR_TRANSLATE: u8 = 1 << 6;
/// The CTR at power-on: self-test passed, AUX port disabled (there is none),
/// translation on, keyboard port enabled, and no interrupts (the guest's driver enables
/// the keyboard interrupt when it wants it).
const CTR_INITIAL: u8 = CTR_SYSTEM_FLAG | CTR_AUX_DISABLED | CTR_TRANSLATE;
/// The output port at power-on: reset line not asserted (bit 0) and A20 enabled (bit 1).
const OUTPUT_PORT_INITIAL: u8 = 0b11;

/// Ctrl, Alt, Del make codes in scan code set 1: what the guest reads with translation
/// on (CTR bit 6, the power-on setting).
const CTRL_ALT_DEL_SET1: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];
/// The same keys in scan code set 2, what a keyboard sends and what the guest reads
/// with translation off (as Firecracker sends them).
const CTRL_ALT_DEL_SET2: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// The commands that wait for a parameter byte on port `0x60`.
const COMMANDS_WITH_PARAMETER: [u8; 5] = [
    CMD_WRITE_CTR,
    CMD_WRITE_OUTPUT_PORT,
    CMD_WRITE_KBD_OUTPUT,
    CMD_WRITE_AUX_OUTPUT,
    CMD_WRITE_AUX,
];

/// The i8042's state for a snapshot ([`I8042::save_state`], [`I8042::restore_state`]):
/// everything the guest can observe. The exit signal and the interrupt line are the
/// VMM's wiring, not state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The controller configuration byte (CTR).
    pub ctr: u8,
    /// The output port, as last written.
    pub output_port: u8,
    /// The bytes waiting on port `0x60`, first to be read first: a command's answer,
    /// or keyboard data. At most [`I8042_OUTPUT_BUFFER_SIZE`].
    pub output: Vec<u8>,
    /// A command (`0x60`, `0xD1`-`0xD4`) waiting for its parameter byte on port `0x60`.
    pub pending_command: Option<u8>,
    /// Whether the last byte written went to port `0x64` (status bit 3).
    pub last_was_command: bool,
}

/// The controller's state; every guest access goes through it under one lock.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    /// The controller configuration byte.
    ctr: u8,
    /// The output port, as last written (its lines are not wired to anything).
    output_port: u8,
    /// The bytes waiting to be read from port 0x60 (at most
    /// [`I8042_OUTPUT_BUFFER_SIZE`]).
    output: VecDeque<u8>,
    /// A command waiting for its parameter byte on port 0x60.
    pending: Option<u8>,
    /// Whether the last byte written went to port 0x64.
    last_was_command: bool,
}

impl State {
    fn new() -> Self {
        State {
            ctr: CTR_INITIAL,
            output_port: OUTPUT_PORT_INITIAL,
            output: VecDeque::with_capacity(I8042_OUTPUT_BUFFER_SIZE),
            pending: None,
            last_was_command: false,
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_UNLOCKED;
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    /// Takes the first byte of the output buffer; 0 when it is empty.
    fn read_data(&mut self) -> u8 {
        self.output.pop_front().unwrap_or(0)
    }

    /// A command's answer: it replaces whatever waited in the output buffer (a real
    /// controller has a one-byte buffer; Firecracker flushes its buffer likewise).
    fn answer(&mut self, byte: u8) {
        self.output.clear();
        self.output.push_back(byte);
    }

    /// Whether keyboard data now waiting should raise IRQ 1.
    fn keyboard_irq_wanted(&self) -> bool {
        self.ctr & CTR_KBD_INT != 0 && !self.output.is_empty()
    }

    fn save(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            output_port: self.output_port,
            output: self.output.iter().copied().collect(),
            pending_command: self.pending,
            last_was_command: self.last_was_command,
        }
    }

    /// The state `saved` describes, if it is one this controller can be in.
    fn restored(saved: &I8042State) -> Result<Self, DeviceError> {
        if saved.output.len() > I8042_OUTPUT_BUFFER_SIZE {
            return Err(DeviceError::I8042StateOutput {
                len: saved.output.len(),
                max: I8042_OUTPUT_BUFFER_SIZE,
            });
        }
        if let Some(command) = saved.pending_command {
            if !COMMANDS_WITH_PARAMETER.contains(&command) {
                return Err(DeviceError::I8042StatePendingCommand { command });
            }
        }
        let mut output = VecDeque::with_capacity(I8042_OUTPUT_BUFFER_SIZE);
        output.extend(saved.output.iter().copied());
        Ok(State {
            ctr: saved.ctr,
            output_port: saved.output_port,
            output,
            pending: saved.pending_command,
            last_was_command: saved.last_was_command,
        })
    }

    /// A byte written to port 0x64. Returns whether it was the reset command.
    fn command(&mut self, command: u8) -> bool {
        self.last_was_command = true;
        // A new command abandons one still waiting for its parameter.
        self.pending = None;
        match command {
            CMD_READ_CTR => self.answer(self.ctr),
            CMD_READ_OUTPUT_PORT => self.answer(self.output_port),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_AUX => self.pending = Some(command),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            // There is no AUX port to enable: the CTR keeps saying it is disabled, as
            // Linux's `i8042_toggle_aux` checks.
            CMD_AUX_ENABLE => {}
            CMD_AUX_TEST => self.answer(AUX_TEST_NO_PORT),
            CMD_SELF_TEST => self.answer(SELF_TEST_OK),
            CMD_KBD_TEST => self.answer(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            CMD_RESET_CPU => return true,
            other => debug_limited!("i8042: ignoring unsupported command {other:#04x}"),
        }
        false
    }

    /// A byte written to port 0x60: a pending command's parameter, or a byte for the
    /// keyboard.
    fn data(&mut self, value: u8) {
        self.last_was_command = false;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTPUT_PORT) => self.output_port = value,
            // With no AUX port, the AUX loop's byte comes back as keyboard data (the
            // status register's AUX bit stays clear), which Linux's loop test reads as
            // "no AUX port".
            Some(CMD_WRITE_KBD_OUTPUT | CMD_WRITE_AUX_OUTPUT) => self.answer(value),
            Some(_) => trace_limited!("i8042: dropping {value:#04x} for the absent AUX device"),
            // No keyboard is emulated: nothing answers.
            None => trace_limited!("i8042: ignoring keyboard byte {value:#04x}"),
        }
    }
}

/// The i8042 keyboard controller, reduced to what a VMM needs: writing the reset
/// command `0xFE` to port `0x64` (bus offset 4) ends the VM cleanly through
/// [`ExitSignal::request`]`(`[`ExitRequest::Reset`]`)`, and the commands Linux's
/// driver probes with are answered at once.
///
/// Insert it at [`I8042_PORT`] with length [`I8042_PORT_SIZE`]; the bus offset is
/// `port - 0x60`. Commands written to port `0x64`:
///
/// | command | what it does |
/// |---|---|
/// | `0x20` | the CTR (controller configuration byte) into the output buffer |
/// | `0x60` | the next byte written to port `0x60` becomes the CTR |
/// | `0xA7` | disables the AUX port (sets CTR bit 5) |
/// | `0xA8` | nothing: there is no AUX port, CTR bit 5 stays set |
/// | `0xA9` | AUX interface test: answers `0x02`, an error (no AUX port) |
/// | `0xAA` | self-test: answers `0x55` (passed) |
/// | `0xAB` | keyboard interface test: answers `0x00` (passed) |
/// | `0xAD`, `0xAE` | disables, enables the keyboard port (CTR bit 4) |
/// | `0xD0` | the output port into the output buffer |
/// | `0xD1` | the next byte on port `0x60` becomes the output port (lines not wired) |
/// | `0xD2` | the next byte on port `0x60` comes back as keyboard data |
/// | `0xD3` | AUX loop: the same, as keyboard data too (there is no AUX port) |
/// | `0xD4` | the next byte on port `0x60` goes to the AUX device: dropped |
/// | `0xFE` | pulses the reset line: ends the VM ([`ExitRequest::Reset`]) |
///
/// Other commands are ignored, and so is a byte on port `0x60` that no command waits
/// for (it would go to the keyboard, which is not emulated: it never answers). The CTR
/// starts as `0x64`: system flag, AUX port disabled, scan-code translation, keyboard
/// interrupt off.
///
/// Reading port `0x64` gives the status register: output buffer full (bit 0) while a
/// byte waits, the system flag (bit 2), whether the last write went to port `0x64`
/// (bit 3), and the key lock open (bit 4); never input buffer full, since every write
/// is handled at once, and never AUX data. Reading port `0x60` takes the first waiting
/// byte (0 when there is none). A command's answer replaces whatever waited. Ports
/// `0x61`-`0x63` read as 0 and ignore writes. An access wider than a byte uses its
/// first byte; the other bytes of a read are all ones.
///
/// # Keyboard input and IRQ 1
///
/// [`I8042::trigger_ctrl_alt_del`] queues the Ctrl, Alt and Del make codes as keyboard
/// data (up to [`I8042_OUTPUT_BUFFER_SIZE`] bytes wait). A controller made with
/// [`I8042::with_keyboard_irq`] raises its line (IRQ 1, [`I8042_KEYBOARD_GSI`]) when
/// keys are queued and again after each read of port `0x60` that leaves bytes waiting,
/// as long as the guest has the keyboard interrupt enabled (CTR bit 0; Linux sets it
/// when it enables the keyboard port). One made with [`I8042::new`] has no line: the
/// bytes still wait, and a guest sees them only by polling the status register, which
/// Linux does not do once booted. For Linux to act on the keys it needs its i8042 and
/// AT keyboard drivers (`CONFIG_SERIO_I8042`, `CONFIG_KEYBOARD_ATKBD`) and, since the
/// keyboard itself does not answer commands, `i8042.dumbkbd` on its command line (as
/// Firecracker documents for `SendCtrlAltDel`), plus `CONFIG_VT` for the keyboard
/// handler; it then handles Ctrl+Alt+Del as `ctrl_alt_del()` does: a restart at once,
/// or, once init has turned that off (as inits do, or by writing 0 to
/// `/proc/sys/kernel/ctrl-alt-del`), `SIGINT` to init. `examples/vmm`'s
/// `linux_devices` test checks the second with Ember's small kernel.
///
/// ```
/// use std::sync::Arc;
/// use ember_bus::BusDevice;
/// use ember_devices::{ExitRequest, ExitSignal, I8042};
///
/// let exit = Arc::new(ExitSignal::new()?);
/// let i8042 = I8042::new(Arc::clone(&exit))?;
/// let mut byte = [0u8];
/// // Read the CTR: command 0x20 on port 0x64, then the answer on port 0x60.
/// i8042.write(4, &[0x20]);
/// i8042.read(4, &mut byte);
/// assert_eq!(byte[0] & 1, 1, "output buffer full");
/// i8042.read(0, &mut byte);
/// assert_eq!(byte, [0x64]);
/// // Reset.
/// i8042.write(4, &[0xfe]);
/// assert_eq!(exit.requested(), Some(ExitRequest::Reset));
/// # Ok::<(), ember_devices::DeviceError>(())
/// ```
pub struct I8042 {
    state: Mutex<State>,
    exit: Arc<ExitSignal>,
    /// The keyboard interrupt (IRQ 1), if the VMM wired one.
    keyboard_irq: Option<IrqLine>,
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// Creates the controller with no keyboard interrupt line; a guest reset will be
    /// reported on `exit`. Keys queued by [`I8042::trigger_ctrl_alt_del`] then wait
    /// for a guest that polls (see the type's documentation).
    pub fn new(exit: Arc<ExitSignal>) -> Result<Self, DeviceError> {
        Ok(I8042 {
            state: Mutex::new(State::new()),
            exit,
            keyboard_irq: None,
        })
    }

    /// Creates the controller with a keyboard interrupt line: keyboard data raises
    /// `irq` while the guest has the keyboard interrupt enabled (CTR bit 0). Register
    /// the line's eventfd as an irqfd for [`I8042_KEYBOARD_GSI`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use ember_bus::BusDevice;
    /// use ember_devices::{ExitSignal, I8042, IrqLine};
    ///
    /// let irq = IrqLine::new()?;
    /// let i8042 = I8042::with_keyboard_irq(Arc::new(ExitSignal::new()?), irq.try_clone()?)?;
    /// // The guest enables the keyboard interrupt: CTR 0x65.
    /// i8042.write(4, &[0x60]);
    /// i8042.write(0, &[0x65]);
    /// i8042.trigger_ctrl_alt_del()?;
    /// assert_eq!(irq.event_fd().read()?, 1);
    /// let mut byte = [0u8];
    /// i8042.read(0, &mut byte);
    /// assert_eq!(byte, [0x1d], "Ctrl, scan code set 1 (translation is on)");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_keyboard_irq(exit: Arc<ExitSignal>, irq: IrqLine) -> Result<Self, DeviceError> {
        Ok(I8042 {
            state: Mutex::new(State::new()),
            exit,
            keyboard_irq: Some(irq),
        })
    }

    /// Presses Ctrl+Alt+Del, as Firecracker's `SendCtrlAltDel` action does: queues the
    /// three keys' make codes as keyboard data and raises the keyboard interrupt if the
    /// controller has a line and the guest enabled it.
    ///
    /// The codes are those the guest reads: scan code set 1 (`1d 38 e0 53`) while the
    /// CTR has translation on (bit 6, the power-on setting), set 2 (`14 11 e0 71`,
    /// Firecracker's) while it is off. Fails with
    /// [`DeviceError::KeyboardBufferFull`], queuing nothing, if fewer than 4 bytes of
    /// the output buffer are free (the guest is not reading its keyboard). If raising
    /// the interrupt fails, the keys stay queued and the failure is logged.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use ember_bus::BusDevice;
    /// use ember_devices::{ExitSignal, I8042};
    ///
    /// let i8042 = I8042::new(Arc::new(ExitSignal::new()?))?;
    /// i8042.trigger_ctrl_alt_del()?;
    /// let mut codes = [0u8; 4];
    /// for code in &mut codes {
    ///     let mut byte = [0u8];
    ///     i8042.read(0, &mut byte);
    ///     *code = byte[0];
    /// }
    /// assert_eq!(codes, [0x1d, 0x38, 0xe0, 0x53]);
    /// # Ok::<(), ember_devices::DeviceError>(())
    /// ```
    pub fn trigger_ctrl_alt_del(&self) -> Result<(), DeviceError> {
        let raise = {
            let mut state = self.lock();
            let free = I8042_OUTPUT_BUFFER_SIZE.saturating_sub(state.output.len());
            let codes = if state.ctr & CTR_TRANSLATE != 0 {
                CTRL_ALT_DEL_SET1
            } else {
                CTRL_ALT_DEL_SET2
            };
            if free < codes.len() {
                return Err(DeviceError::KeyboardBufferFull {
                    needed: codes.len(),
                    free,
                });
            }
            state.output.extend(codes);
            state.keyboard_irq_wanted()
        };
        if raise {
            self.raise_keyboard_irq();
        }
        Ok(())
    }

    /// The controller's state, for a snapshot. Take it while the vCPUs are paused.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use ember_bus::BusDevice;
    /// use ember_devices::{ExitSignal, I8042};
    ///
    /// let exit = Arc::new(ExitSignal::new()?);
    /// let old = I8042::new(Arc::clone(&exit))?;
    /// old.write(4, &[0xad]); // disable the keyboard port: CTR 0x74
    /// let new = I8042::new(exit)?;
    /// new.restore_state(&old.save_state())?;
    /// new.write(4, &[0x20]);
    /// let mut ctr = [0u8];
    /// new.read(0, &mut ctr);
    /// assert_eq!(ctr, [0x74]);
    /// # Ok::<(), ember_devices::DeviceError>(())
    /// ```
    pub fn save_state(&self) -> I8042State {
        self.lock().save()
    }

    /// Restores a state from [`I8042::save_state`], before the guest runs. The
    /// interrupt is not raised again: one raised before the snapshot is pending in the
    /// saved interrupt controller state, or was already taken.
    ///
    /// Fails, changing nothing, if the state is not one this controller can be in:
    /// more than [`I8042_OUTPUT_BUFFER_SIZE`] bytes waiting
    /// ([`DeviceError::I8042StateOutput`]) or a pending command that takes no
    /// parameter ([`DeviceError::I8042StatePendingCommand`]).
    pub fn restore_state(&self, state: &I8042State) -> Result<(), DeviceError> {
        let restored = State::restored(state)?;
        *self.lock() = restored;
        Ok(())
    }

    fn raise_keyboard_irq(&self) {
        if let Some(irq) = &self.keyboard_irq {
            if let Err(err) = irq.trigger() {
                ember_rate_limiter::warn_limited!("i8042: raising the keyboard interrupt: {err}");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset >= I8042_PORT_SIZE {
            return;
        }
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            DATA_OFFSET => {
                let (byte, more) = {
                    let mut state = self.lock();
                    (state.read_data(), state.keyboard_irq_wanted())
                };
                // Keyboard data still waiting: one interrupt per byte, as Firecracker.
                if more {
                    self.raise_keyboard_irq();
                }
                byte
            }
            COMMAND_OFFSET => self.lock().status(),
            _ => 0,
        };
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            DATA_OFFSET => self.lock().data(value),
            COMMAND_OFFSET => {
                let reset = self.lock().command(value);
                if reset {
                    ember_rate_limiter::info_limited!(
                        "guest requested a reset through the i8042; ending the VM"
                    );
                    self.exit.request(ExitRequest::Reset);
                }
            }
            _ => trace_limited!("i8042: ignoring write of {value:#04x} at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fuzz_device;
    use ember_bus::{Bus, BusKind};

    const BASE: u64 = I8042_PORT as u64;
    const DATA: u64 = 0x60;
    const CMD: u64 = 0x64;

    fn setup() -> (Bus, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let bus = Bus::new(BusKind::Pio);
        let dev = I8042::new(Arc::clone(&exit)).unwrap();
        bus.insert(BASE, I8042_PORT_SIZE, Arc::new(dev)).unwrap();
        (bus, exit)
    }

    fn read(bus: &Bus, port: u64) -> u8 {
        let mut byte = [0xaa];
        bus.read(port, &mut byte).unwrap();
        byte[0]
    }

    fn status(bus: &Bus) -> u8 {
        read(bus, CMD)
    }

    /// Linux's `__i8042_command`: the command, its parameters, then for each answer
    /// a wait for "output buffer full" (here: it must already be set) and a read.
    fn command(bus: &Bus, cmd: u8, params: &[u8], answers: usize) -> Vec<u8> {
        assert_eq!(status(bus) & 0x02, 0, "input buffer never full");
        bus.write(CMD, &[cmd]).unwrap();
        for &p in params {
            bus.write(DATA, &[p]).unwrap();
        }
        (0..answers)
            .map(|_| {
                assert_ne!(status(bus) & 0x01, 0, "answer to {cmd:#04x} waiting");
                read(bus, DATA)
            })
            .collect()
    }

    #[test]
    fn reset_command_requests_reset() {
        let (bus, exit) = setup();
        bus.write(CMD, &[0xfe]).unwrap();
        assert_eq!(exit.requested(), Some(ExitRequest::Reset));
        assert_eq!(exit.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn wide_reset_write_uses_first_byte() {
        let (bus, exit) = setup();
        bus.write(0x63, &[0xfe, 0xfe]).unwrap(); // offset 3: not the command port
        assert_eq!(exit.requested(), None);
        // Bus rejects 0x64 + 2 bytes (outside the range), so only 1-byte at 0x64 works.
        assert!(bus.write(CMD, &[0xfe, 0]).is_err());
        assert_eq!(exit.requested(), None);
        // Directly, a wide write at the command port uses its first byte.
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = I8042::new(Arc::clone(&exit)).unwrap();
        dev.write(COMMAND_OFFSET, &[0xfe, 0, 0, 0]);
        assert_eq!(exit.requested(), Some(ExitRequest::Reset));
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let (bus, exit) = setup();
        for value in 0..=u8::MAX {
            if value != 0xfe {
                bus.write(CMD, &[value]).unwrap();
            }
        }
        for port in 0x60..0x64 {
            bus.write(port, &[0xfe]).unwrap();
        }
        assert_eq!(exit.requested(), None);
        assert!(exit.event_fd().read().is_err());
    }

    #[test]
    fn idle_status_and_registers() {
        let (bus, _exit) = setup();
        // System flag and key lock open; nothing to read, nothing being written.
        assert_eq!(status(&bus), 0x14);
        assert_eq!(read(&bus, DATA), 0, "empty output buffer reads 0");
        for port in 0x61..0x64 {
            assert_eq!(read(&bus, port), 0);
        }
        let mut word = [0u8; 4];
        bus.read(DATA, &mut word).unwrap();
        assert_eq!(word, [0, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn read_ctr() {
        let (bus, _exit) = setup();
        assert_eq!(command(&bus, 0x20, &[], 1), [0x64]);
        // Reading the answer empties the output buffer; the command bit stays.
        assert_eq!(status(&bus), 0x14 | 0x08);
        // Twice in a row, the same byte (Linux wants two equal reads).
        assert_eq!(command(&bus, 0x20, &[], 1), [0x64]);
        // Until read, the answer waits and the status says so.
        bus.write(CMD, &[0x20]).unwrap();
        assert_eq!(status(&bus), 0x14 | 0x08 | 0x01);
        assert_eq!(read(&bus, DATA), 0x64);
        assert_eq!(read(&bus, DATA), 0, "read once");
    }

    #[test]
    fn write_ctr() {
        let (bus, _exit) = setup();
        assert_eq!(command(&bus, 0x60, &[0x47], 0), []);
        assert_eq!(status(&bus) & 0x08, 0, "last write went to the data port");
        assert_eq!(command(&bus, 0x20, &[], 1), [0x47]);
        // Only the byte right after the command is the CTR.
        bus.write(DATA, &[0x11]).unwrap();
        assert_eq!(command(&bus, 0x20, &[], 1), [0x47]);
        // A command in between abandons the write.
        bus.write(CMD, &[0x60]).unwrap();
        bus.write(CMD, &[0xad]).unwrap();
        bus.write(DATA, &[0x00]).unwrap();
        assert_eq!(command(&bus, 0x20, &[], 1), [0x47 | 0x10]);
    }

    #[test]
    fn self_test_and_keyboard_test() {
        let (bus, _exit) = setup();
        assert_eq!(command(&bus, 0xaa, &[], 1), [0x55]);
        assert_eq!(command(&bus, 0xab, &[], 1), [0x00]);
        assert_eq!(command(&bus, 0x20, &[], 1), [0x64], "CTR unchanged");
    }

    #[test]
    fn keyboard_port_enable_and_disable() {
        let (bus, _exit) = setup();
        command(&bus, 0xad, &[], 0);
        assert_eq!(command(&bus, 0x20, &[], 1), [0x74]);
        command(&bus, 0xae, &[], 0);
        assert_eq!(command(&bus, 0x20, &[], 1), [0x64]);
    }

    #[test]
    fn aux_port_is_absent() {
        let (bus, _exit) = setup();
        // 0xA8 cannot enable what is not there; 0xA7 disables it.
        command(&bus, 0x60, &[0x04], 0);
        command(&bus, 0xa8, &[], 0);
        assert_eq!(command(&bus, 0x20, &[], 1), [0x04]);
        command(&bus, 0xa7, &[], 0);
        assert_eq!(command(&bus, 0x20, &[], 1), [0x24]);
        command(&bus, 0xa8, &[], 0);
        assert_eq!(command(&bus, 0x20, &[], 1), [0x24], "AUX stays disabled");
        // The interface test reports an error.
        assert_eq!(command(&bus, 0xa9, &[], 1), [0x02]);
        // The AUX device gets nothing and answers nothing.
        command(&bus, 0xd4, &[0xff], 0);
        assert_eq!(status(&bus) & 0x01, 0);
    }

    /// `i8042_check_aux`'s first steps: the AUX loop test must fail at once (an answer
    /// without the AUX bit), then the AUX interface test must report an error.
    #[test]
    fn linux_aux_probe_fails_fast() {
        let (bus, _exit) = setup();
        bus.write(CMD, &[0xd3]).unwrap();
        bus.write(DATA, &[0x5a]).unwrap();
        let st = status(&bus);
        assert_ne!(st & 0x01, 0, "an answer, so no timeout");
        assert_eq!(
            st & 0x20,
            0,
            "not from the AUX port: Linux's loop test fails"
        );
        // Linux leaves that byte unread and sends the interface test, whose answer
        // replaces it.
        assert_eq!(command(&bus, 0xa9, &[], 1), [0x02]);
        assert_eq!(status(&bus) & 0x01, 0);
    }

    #[test]
    fn output_port_and_keyboard_output() {
        let (bus, _exit) = setup();
        assert_eq!(command(&bus, 0xd0, &[], 1), [0x03]);
        command(&bus, 0xd1, &[0xdd], 0);
        assert_eq!(command(&bus, 0xd0, &[], 1), [0xdd]);
        assert_eq!(command(&bus, 0xd2, &[0x9c], 1), [0x9c]);
    }

    /// The commands Linux 6.1 sends from `i8042_init` to the end of
    /// `i8042_check_aux`, in order, with the answers it needs to go on without a
    /// timeout.
    #[test]
    fn linux_probe_sequence() {
        let (bus, exit) = setup();
        // i8042_controller_check: flush (nothing waiting).
        assert_eq!(status(&bus) & 0x01, 0);
        // i8042_controller_init: two equal CTR reads, the key lock open, CTR write.
        let ctr = command(&bus, 0x20, &[], 1)[0];
        assert_eq!(command(&bus, 0x20, &[], 1)[0], ctr);
        assert_ne!(status(&bus) & 0x10, 0, "no 'Keylock active' warning");
        let ctr = (ctr | 0x10) & !0x01;
        command(&bus, 0x60, &[ctr], 0);
        // i8042_check_aux: loop test (fails at once), interface test (error).
        bus.write(CMD, &[0xd3]).unwrap();
        bus.write(DATA, &[0x5a]).unwrap();
        assert_eq!(status(&bus) & 0x21, 0x01);
        assert_eq!(command(&bus, 0xa9, &[], 1), [0x02]);
        // i8042_controller_reset on a failed probe: restore the CTR.
        command(&bus, 0x60, &[0x64], 0);
        assert_eq!(command(&bus, 0x20, &[], 1), [0x64]);
        assert_eq!(exit.requested(), None);
    }

    #[test]
    fn odd_widths_and_offsets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = I8042::new(Arc::clone(&exit)).unwrap();
        dev.write(COMMAND_OFFSET, &[]);
        dev.write(DATA_OFFSET, &[]);
        dev.write(I8042_PORT_SIZE, &[0xfe]);
        dev.write(u64::MAX, &[0xfe]);
        let mut empty = [];
        dev.read(COMMAND_OFFSET, &mut empty);
        let mut byte = [0xaa];
        dev.read(u64::MAX, &mut byte);
        assert_eq!(byte, [0xff], "outside the device: all ones");
        assert_eq!(exit.requested(), None);
        // A wide command write uses its first byte; a wide read returns it first.
        dev.write(COMMAND_OFFSET, &[0x20, 0xfe]);
        let mut wide = [0u8; 8];
        dev.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0x64, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(exit.requested(), None);
    }

    /// An i8042 with a keyboard line on a bus; the test keeps a view of the line.
    fn setup_with_irq() -> (Bus, Arc<I8042>, IrqLine) {
        let irq = IrqLine::new().unwrap();
        let view = irq.try_clone().unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = Arc::new(I8042::with_keyboard_irq(exit, irq).unwrap());
        let bus = Bus::new(BusKind::Pio);
        bus.insert(BASE, I8042_PORT_SIZE, dev.clone()).unwrap();
        (bus, dev, view)
    }

    fn irq_count(irq: &IrqLine) -> u64 {
        irq.event_fd().read().unwrap_or(0)
    }

    /// Reads the keyboard bytes the way Linux's interrupt handler does (status, then
    /// data), and how many interrupts came after each read.
    fn read_keys(bus: &Bus, irq: &IrqLine, n: usize) -> Vec<(u8, u64)> {
        (0..n)
            .map(|_| {
                assert_ne!(status(bus) & 0x01, 0, "a byte waits");
                let byte = read(bus, DATA);
                (byte, irq_count(irq))
            })
            .collect()
    }

    #[test]
    fn ctrl_alt_del_with_translation_raises_irq_1_per_byte() {
        let (bus, dev, irq) = setup_with_irq();
        // Linux enables the keyboard interrupt: CTR 0x65.
        command(&bus, 0x60, &[0x65], 0);
        assert_eq!(irq_count(&irq), 0, "a CTR write raises nothing");
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irq_count(&irq), 1);
        // Each read leaving bytes behind raises the line again; the last does not.
        assert_eq!(
            read_keys(&bus, &irq, 4),
            [(0x1d, 1), (0x38, 1), (0xe0, 1), (0x53, 0)]
        );
        assert_eq!(status(&bus) & 0x01, 0);
        assert_eq!(read(&bus, DATA), 0);
        assert_eq!(irq_count(&irq), 0);
    }

    #[test]
    fn ctrl_alt_del_without_translation_sends_set_2() {
        let (bus, dev, irq) = setup_with_irq();
        command(&bus, 0x60, &[0x25], 0);
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irq_count(&irq), 1);
        let keys: Vec<u8> = read_keys(&bus, &irq, 4).iter().map(|k| k.0).collect();
        assert_eq!(keys, [0x14, 0x11, 0xe0, 0x71]);
    }

    #[test]
    fn ctrl_alt_del_with_the_interrupt_disabled_only_queues() {
        let (bus, dev, irq) = setup_with_irq();
        // Power-on CTR: keyboard interrupt off.
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irq_count(&irq), 0);
        let keys = read_keys(&bus, &irq, 4);
        assert_eq!(keys, [(0x1d, 0), (0x38, 0), (0xe0, 0), (0x53, 0)]);

        // No line at all: the same bytes, nothing to raise.
        let dev = I8042::new(Arc::new(ExitSignal::new().unwrap())).unwrap();
        dev.write(COMMAND_OFFSET, &[0x60]);
        dev.write(DATA_OFFSET, &[0x65]);
        dev.trigger_ctrl_alt_del().unwrap();
        let mut byte = [0u8];
        dev.read(COMMAND_OFFSET, &mut byte);
        assert_eq!(byte[0] & 0x01, 0x01);
        dev.read(DATA_OFFSET, &mut byte);
        assert_eq!(byte, [0x1d]);
    }

    #[test]
    fn ctrl_alt_del_into_a_full_buffer_is_refused_whole() {
        let (bus, dev, irq) = setup_with_irq();
        for _ in 0..I8042_OUTPUT_BUFFER_SIZE / 4 {
            dev.trigger_ctrl_alt_del().unwrap();
        }
        match dev.trigger_ctrl_alt_del().unwrap_err() {
            DeviceError::KeyboardBufferFull { needed, free } => assert_eq!((needed, free), (4, 0)),
            other => panic!("{other:?}"),
        }
        // One byte read: still no room for four.
        assert_eq!(read(&bus, DATA), 0x1d);
        assert!(matches!(
            dev.trigger_ctrl_alt_del(),
            Err(DeviceError::KeyboardBufferFull { needed: 4, free: 1 })
        ));
        assert_eq!(dev.save_state().output.len(), I8042_OUTPUT_BUFFER_SIZE - 1);
        assert_eq!(irq_count(&irq), 0);
    }

    #[test]
    fn a_command_answer_replaces_queued_keys() {
        let (bus, dev, _irq) = setup_with_irq();
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(command(&bus, 0x20, &[], 1), [0x64]);
        assert_eq!(status(&bus) & 0x01, 0);
    }

    #[test]
    fn survives_random_accesses() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = Arc::new(I8042::new(Arc::clone(&exit)).unwrap());
        fuzz_device(dev, BASE, I8042_PORT_SIZE, 0x8042);
        // Whatever the fuzzer did, the only possible request is a reset.
        assert!(matches!(exit.requested(), None | Some(ExitRequest::Reset)));
    }
}
