//! The snapshot state file as the VMM reads it, then applied to real devices.
//!
//! 1. Parsing: [`ember_snapshot::decode`] on raw bytes, twice: the input as a whole
//!    state file (header, length, CRC and payload all from the fuzzer: mostly refused
//!    by the container checks), and the input as the payload of a valid container
//!    (header and CRC-64 computed here), which gets past the checksum into postcard and
//!    serde with every byte chosen by the fuzzer.
//! 2. Restoring: what decoded goes to the devices' real `restore_state`, as
//!    `examples/vmm`'s `restore_vm` does (serial, i8042, then each virtio transport):
//!    an [`ember_devices::Serial`] with a sink output, an [`ember_devices::I8042`], and
//!    per [`MmioTransportState`] a fresh [`MmioTransport`] over 1 MiB of guest memory
//!    with a real device (virtio-net on a quiet backend if the state says device type
//!    1, virtio-rng otherwise, so that other types exercise the device-type check),
//!    each with real rate limiters (so saved limiter levels are checked against them). An
//!    activated state that is accepted starts the device's worker thread on the
//!    restored queues; a few register reads follow, then everything is dropped (which
//!    stops the worker). vCPU and VM (irqchip, PIT, clock) states are only parsed:
//!    applying them needs KVM.
//!
//! The state type is [`FuzzState`]: exactly the crates' state types that the VMM's
//! `MicrovmState` (`examples/vmm/src/snapshot.rs`, which this crate cannot depend on)
//! holds, in its field order. `MicrovmState`'s leading fields (`ember_version`, `kind`,
//! the examples-only `VmConfig`, `cpu_template`, `syscall_trap`) are left out, so a
//! `MicrovmState` payload with those fields' bytes cut off is a `FuzzState` payload.
//!
//! Checked: no panic, hang, or allocation beyond what the input backs
//! (`-malloc_limit_mb`); a valid container around any payload fails, if at all, only
//! with [`SnapshotError::Decode`]; a raw input that decodes is exactly a valid
//! container around a payload that decodes; whatever decodes encodes and decodes back
//! to itself. Restores: the serial port and the i8042 refuse a state exactly when
//! their documentation says, change nothing when they refuse, and save back what they
//! restored; a transport that refuses a state changes nothing (it saves what a fresh
//! one saves); one that accepts it reads back its identity, status, queue selection
//! and configuration generation, saves back the state (not activated), or pauses and
//! saves back the same registers and queues (activated; ring positions and interrupt
//! bits may move while the worker runs, and limiter levels may only go down).
//!
//! Cost per input: at most [`MAX_TRANSPORTS`] transports, and a worker thread only for
//! an activated state that passes every check. Spawning and joining it is the cost
//! (about 0.3 ms per running device on the nested-KVM development machine, where a bare
//! `thread::spawn` and `join` takes as long; microseconds for everything else), so
//! activated states are not restricted: the first 120 s run averaged 6000 inputs a
//! second, and an input pays at most four spawns.

use std::io;
use std::sync::Arc;

use ember_bus::BusDevice;
use ember_devices::{
    ExitSignal, I8042State, IrqLine, Serial, SerialOutput, SerialState, I8042,
    I8042_OUTPUT_BUFFER_SIZE, SERIAL_FIFO_SIZE,
};
use ember_rate_limiter::{RateLimiterConfig, TokenBucketConfig, TokenBucketState};
use ember_snapshot::{decode, encode, frame, unframe, SnapshotError};
use ember_vcpu::state::VcpuState;
use ember_virtio::mmio::{reg, MmioTransport};
use ember_virtio::vm_memory::{GuestAddress, GuestMemoryMmap};
use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use ember_virtio::{ActivateDevice, MmioTransportState};
use ember_virtio_devices::{Net, NetBackend, Rng};
use ember_vm::VmState;
use serde::{Deserialize, Serialize};

/// The format version the harness reads and writes.
pub const VERSION: u32 = 2;

/// Guest memory behind the restored transports.
pub const MEMORY_SIZE: usize = 1 << 20;

/// Transports restored per input (the VMM has a handful of devices; each running one
/// costs a thread spawn).
pub const MAX_TRANSPORTS: usize = 4;

/// virtio device type of the network device.
const NET: u32 = 1;

/// The crate-level part of the VMM's `MicrovmState`, in its field order (see the
/// module documentation): the same types, so the same serde code parses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuzzState {
    /// Irqchip, PIT and kvmclock.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// Every virtio device's transport, queues included, in attach order.
    pub virtio: Vec<MmioTransportState>,
}

type Mem = Arc<GuestMemoryMmap>;

/// The harness: `data` is a state file, then a payload.
pub fn run(data: &[u8]) {
    // The input as a whole state file.
    let raw = decode::<FuzzState>(data, VERSION);
    if let Ok(state) = &raw {
        check_round_trip(state);
        // It got through every container check, so it is a container.
        let payload = unframe(data, VERSION).expect("decoded input unframes");
        assert_eq!(frame(VERSION, payload).expect("frames").as_slice(), data);
        restore(state);
    }

    // The input as the payload of a valid container.
    let Ok(file) = frame(VERSION, data) else {
        return;
    };
    match decode::<FuzzState>(&file, VERSION) {
        Ok(state) => {
            check_round_trip(&state);
            restore(&state);
        }
        Err(SnapshotError::Decode(_)) => {}
        Err(other) => panic!("a valid container refused: {other}"),
    }
}

fn check_round_trip(state: &FuzzState) {
    let bytes = encode(VERSION, state).expect("a decoded state encodes");
    let back = decode::<FuzzState>(&bytes, VERSION).expect("an encoded state decodes");
    assert_eq!(&back, state, "state changed through encode and decode");
}

/// What [`restore`] did with a state's devices.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The serial port accepted its state.
    pub serial: bool,
    /// The i8042 accepted its state.
    pub i8042: bool,
    /// Transports that accepted their state.
    pub transports: usize,
    /// Of those, the ones whose device runs (a worker thread was started).
    pub activated: usize,
}

/// Applies `state` to real devices, as the VMM's restore does (without KVM), checking
/// them (see the module documentation); every device is dropped before it returns.
pub fn restore(state: &FuzzState) -> Restored {
    let mut done = Restored {
        serial: restore_serial(&state.serial),
        i8042: restore_i8042(&state.i8042),
        ..Restored::default()
    };
    if state.virtio.is_empty() {
        return done;
    }
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return done;
    };
    let mem = Arc::new(mem);
    for saved in state.virtio.iter().take(MAX_TRANSPORTS) {
        if let Some(activated) = restore_transport(&mem, saved) {
            done.transports += 1;
            done.activated += usize::from(activated);
        }
    }
    done
}

fn restore_serial(state: &SerialState) -> bool {
    let (Ok(irq), fresh) = (IrqLine::new(), SerialState::default()) else {
        return false;
    };
    let Ok(serial) = Serial::new(SerialOutput::Sink, irq) else {
        return false;
    };
    match serial.restore_state(state) {
        Ok(()) => {
            assert!(state.in_buffer.len() <= SERIAL_FIFO_SIZE);
            assert_eq!(&serial.save_state(), state, "serial: restored != saved");
            let mut byte = [0u8];
            // Scratch, line status, interrupt identification, then the data register.
            serial.read(7, &mut byte);
            assert_eq!(byte[0], state.scratch, "serial: scratch register");
            for offset in [5, 2, 0] {
                serial.read(offset, &mut byte);
            }
            // Room for what the guest did not read, and the byte just read.
            let expected = SERIAL_FIFO_SIZE - state.in_buffer.len().saturating_sub(1);
            if state.line_control & 0x80 == 0 {
                assert_eq!(serial.input_capacity(), expected, "serial: FIFO room");
            }
            true
        }
        Err(_) => {
            // Refused only for too much input (an eventfd failure aside), changing
            // nothing.
            assert!(
                state.in_buffer.len() > SERIAL_FIFO_SIZE,
                "serial refused a state with {} input bytes",
                state.in_buffer.len()
            );
            assert_eq!(
                serial.save_state(),
                fresh,
                "serial: a refused state changed it"
            );
            false
        }
    }
}

fn restore_i8042(state: &I8042State) -> bool {
    let Ok(exit) = ExitSignal::new() else {
        return false;
    };
    let Ok(i8042) = I8042::new(Arc::new(exit)) else {
        return false;
    };
    let fresh = i8042.save_state();
    let valid = state.output.len() <= I8042_OUTPUT_BUFFER_SIZE
        && matches!(state.pending_command, None | Some(0x60 | 0xd1..=0xd4));
    match i8042.restore_state(state) {
        Ok(()) => {
            assert!(valid, "i8042 accepted {state:?}");
            assert_eq!(&i8042.save_state(), state, "i8042: restored != saved");
            let mut byte = [0u8];
            // Status (output-buffer-full bit), then the data port.
            i8042.read(4, &mut byte);
            assert_eq!(
                byte[0] & 1,
                u8::from(!state.output.is_empty()),
                "i8042: output buffer full bit"
            );
            i8042.read(0, &mut byte);
            if let Some(&first) = state.output.first() {
                assert_eq!(byte[0], first, "i8042: first output byte");
            }
            true
        }
        Err(_) => {
            assert!(!valid, "i8042 refused {state:?}");
            assert_eq!(
                i8042.save_state(),
                fresh,
                "i8042: a refused state changed it"
            );
            false
        }
    }
}

/// A network backend that swallows frames and has nothing to receive.
struct Quiet;

impl NetBackend for Quiet {
    fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        Ok(frame.len())
    }
}

fn read_reg(t: &MmioTransport<Mem>, offset: u64) -> u32 {
    let mut bytes = [0u8; 4];
    t.read(offset, &mut bytes);
    u32::from_le_bytes(bytes)
}

/// A bucket that refills so slowly (an hour) that its level cannot change while an
/// input runs, except by what the device takes.
fn slow_bucket(size: u64, one_time_burst: u64) -> Option<TokenBucketConfig> {
    Some(TokenBucketConfig {
        size,
        one_time_burst,
        refill_time_ms: 3_600_000,
    })
}

/// The network device the harness restores: rx limited by bandwidth, tx by
/// operations, so that saved limiter levels meet real limiters (and every mismatch).
pub fn harness_net() -> Net {
    let mut net = Net::with_backend(Box::new(Quiet), Some([2, 0, 0, 0, 0, 1]));
    net.set_rate_limiters(
        RateLimiterConfig {
            bandwidth: slow_bucket(1 << 20, 4096),
            ops: None,
        },
        RateLimiterConfig {
            bandwidth: None,
            ops: slow_bucket(256, 0),
        },
    )
    .expect("valid limits");
    net
}

/// The entropy device the harness restores for every other device type: limited by
/// both buckets.
pub fn harness_rng() -> Rng {
    Rng::new()
        .with_rate_limiter(RateLimiterConfig {
            bandwidth: slow_bucket(1 << 16, 1 << 12),
            ops: slow_bucket(64, 8),
        })
        .expect("valid limits")
}

/// Restores `saved` into a new transport; `None` if refused, else whether it runs.
fn restore_transport(mem: &Mem, saved: &MmioTransportState) -> Option<bool> {
    let device: Box<dyn ActivateDevice<Mem>> = if saved.device_type == NET {
        Box::new(harness_net())
    } else {
        Box::new(harness_rng())
    };
    let irq = EventFd::new(EFD_NONBLOCK).ok()?;
    let t = MmioTransport::new(device, Arc::clone(mem), irq).ok()?;
    let fresh = t.save_state().expect("a fresh transport saves");
    if t.restore_state(saved).is_err() {
        assert!(!t.is_activated(), "a refused state activated the device");
        assert!(!t.is_paused(), "a refused state paused the device");
        assert_eq!(
            t.save_state()
                .expect("a refused state leaves the device stopped"),
            fresh,
            "a refused state changed the transport"
        );
        return None;
    }
    assert_eq!(t.is_activated(), saved.activated, "activation not restored");
    assert_eq!(read_reg(&t, reg::MAGIC_VALUE), 0x7472_6976, "MagicValue");
    assert_eq!(read_reg(&t, reg::DEVICE_ID), saved.device_type, "DeviceID");
    assert_eq!(read_reg(&t, reg::STATUS), saved.status, "Status");
    assert_eq!(
        read_reg(&t, reg::CONFIG_GENERATION),
        saved.config_generation,
        "ConfigGeneration"
    );
    let selected = usize::try_from(saved.queue_sel)
        .ok()
        .and_then(|q| saved.queues.get(q).zip(saved.queue_max_sizes.get(q)));
    assert_eq!(
        read_reg(&t, reg::QUEUE_NUM_MAX),
        selected.map_or(0, |(_, &max)| u32::from(max)),
        "QueueNumMax of queue {}",
        saved.queue_sel
    );
    assert_eq!(
        read_reg(&t, reg::QUEUE_READY),
        selected.map_or(0, |(q, _)| u32::from(q.ready)),
        "QueueReady of queue {}",
        saved.queue_sel
    );
    let interrupts = read_reg(&t, reg::INTERRUPT_STATUS);
    if !saved.activated {
        assert_eq!(interrupts, saved.interrupt_status, "InterruptStatus");
        assert_eq!(
            &t.save_state().expect("an inactive transport saves"),
            saved,
            "restored != saved"
        );
        return Some(false);
    }
    // Running: the worker may have served chains (moving ring positions, taking
    // tokens) and raised the used-buffer interrupt; nothing else moves.
    assert_eq!(interrupts & saved.interrupt_status, saved.interrupt_status);
    t.pause().expect("a restored device pauses");
    let mut back = t.save_state().expect("a paused transport saves");
    back.interrupt_status = saved.interrupt_status;
    assert_eq!(back.rate_limiters.len(), saved.rate_limiters.len());
    for (b, s) in back.rate_limiters.iter().zip(&saved.rate_limiters) {
        for (b, s) in [(b.bandwidth, s.bandwidth), (b.ops, s.ops)] {
            let tokens = |l: TokenBucketState| {
                i128::from(l.budget) + i128::from(l.one_time_burst) - i128::from(l.debt)
            };
            let (Some(b), Some(s)) = (b, s) else {
                panic!("a restored limiter lost or gained a bucket: {b:?}, {s:?}");
            };
            assert!(tokens(b) <= tokens(s), "tokens appeared: {b:?} after {s:?}");
        }
    }
    back.rate_limiters.clone_from(&saved.rate_limiters);
    for (b, s) in back.queues.iter_mut().zip(&saved.queues) {
        if let (Some(b), Some(s)) = (&mut b.active, &s.active) {
            b.next_avail = s.next_avail;
            b.next_used = s.next_used;
        }
    }
    assert_eq!(&back, saved, "paused state != restored state");
    // Dropping the transport drops the paused queues; nothing runs any more.
    Some(true)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        crate::seeds::all()
            .into_iter()
            .find(|s| s.target == "snapshot_state" && s.name == name)
            .expect("seed exists")
            .data
    }

    fn decoded(name: &str) -> FuzzState {
        let file = frame(VERSION, &seed(name)).expect("frames");
        decode(&file, VERSION).expect("seed decodes")
    }

    #[test]
    fn seeds_reach_every_restore() {
        let done = restore(&decoded("payload-two-vcpus-devices"));
        assert_eq!(
            done,
            Restored {
                serial: true,
                i8042: true,
                transports: 2,
                activated: 1,
            },
            "the activated rng and the negotiated net restore"
        );
        let one = restore(&decoded("payload-one-vcpu"));
        assert_eq!((one.transports, one.activated), (1, 0));
    }

    #[test]
    fn refused_states_are_refused() {
        let mut state = decoded("payload-devices-activated-rng");
        state.serial.in_buffer = vec![0; SERIAL_FIFO_SIZE + 1];
        state.i8042.pending_command = Some(0x20);
        // The used ring past the end of guest memory.
        let active = state.virtio[0].queues[0].active.as_mut().expect("active");
        active.used_ring = MEMORY_SIZE as u64 - 8;
        // Only the (not activated) net transport is left to accept its state.
        let expected = Restored {
            transports: 1,
            ..Restored::default()
        };
        assert_eq!(restore(&state), expected);
    }

    /// Not an assertion on speed (machines differ): prints what one restore of a
    /// running device costs, to keep an eye on the fuzzer's executions per second.
    #[test]
    fn activated_restore_cost() {
        let state = decoded("payload-devices-activated-rng");
        let rounds = 200;
        let start = Instant::now();
        for _ in 0..rounds {
            assert_eq!(restore(&state).activated, 1);
        }
        eprintln!(
            "restore with a worker thread: {:?}",
            start.elapsed() / rounds
        );
    }
}
