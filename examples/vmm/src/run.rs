//! Runs a built VM: one thread per vCPU, and this thread's event loop for everything
//! else (serial input, devices asking to end the VM, vCPUs ending).

use std::cell::Cell;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use ember_devices::{ExitRequest, Serial};
use ember_vcpu::{ExitKind, RunningVcpu, SystemEvent, VcpuError, VcpuOutcome};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::Vm;

/// Why running a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A vCPU failed (entry failure, KVM error).
    #[error("{0}")]
    Vcpu(VcpuError),
    /// KVM could not emulate a guest instruction.
    #[error("vCPU {vcpu}: KVM cannot emulate the instruction at RIP {rip:#x} ({text}; bytes: {bytes}); try: {advice}")]
    Emulation {
        /// vCPU index.
        vcpu: u32,
        /// Guest RIP.
        rip: u64,
        /// The instruction, decoded.
        text: String,
        /// Its bytes.
        bytes: ember_vcpu::InstructionBytes,
        /// What to try.
        advice: &'static str,
    },
    /// The guest triple-faulted.
    #[error("vCPU {0}: the guest triple-faulted (KVM_EXIT_SHUTDOWN)")]
    TripleFault(u32),
    /// The guest reported a crash.
    #[error("vCPU {0}: the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")]
    GuestCrash(u32),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
}

impl From<VcpuError> for RunError {
    fn from(e: VcpuError) -> Self {
        match e {
            VcpuError::EmulationFailure { vcpu, rip, bytes } => {
                let (text, advice) = crate::hint::emulation_advice(bytes.as_slice());
                RunError::Emulation {
                    vcpu,
                    rip,
                    text,
                    bytes,
                    advice,
                }
            }
            other => RunError::Vcpu(other),
        }
    }
}

/// How the VM ended, and what it saw on the way.
#[derive(Debug)]
pub struct RunReport {
    /// The VMM's exit code.
    pub exit_code: i32,
    /// Human-readable reason.
    pub reason: String,
    /// Exits per reason, summed over vCPUs.
    pub exits: Vec<(ExitKind, u64)>,
    /// Guest accesses that reached no device, per bus.
    pub unclaimed: String,
}

/// Wakes the loop when a device asks to end the VM or a vCPU's run loop ends.
struct EndWatcher {
    exit_fd: i32,
    vcpu_done: EventFd,
    ended: Rc<Cell<bool>>,
}

/// Ends the VM on SIGINT or SIGTERM, read from a signalfd.
struct SignalWatcher {
    signals: std::fs::File,
    ended: Rc<Cell<bool>>,
    received: Rc<Cell<Option<i32>>>,
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        if let Ok(n) = self.signals.read(&mut info) {
            if n == info.len() {
                // ssi_signo is the first field, a u32.
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                self.received.set(Some(signo as i32));
            }
        }
        self.ended.set(true);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, EventSet::IN)) {
            log::warn!("cannot watch for SIGINT/SIGTERM: {e}");
        }
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread it spawns after)
/// and returns a signalfd that reads them. Call before spawning vCPU threads.
pub fn block_termination_signals() -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only write to it, or read it and
    // change this thread's signal mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: -1 asks for a new fd; `set` is initialised; the result is checked.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

impl MutEventSubscriber for EndWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.ended.set(true);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit_fd, self.vcpu_done.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch fd {fd}: {e}");
                self.ended.set(true);
            }
        }
    }
}

/// Feeds standard input to the serial port.
struct StdinToSerial {
    serial: Arc<Serial>,
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let room = self.serial.input_capacity().clamp(1, buf.len());
        match std::io::stdin().lock().read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                // EOF or an unreadable stdin: stop watching it, keep the VM running.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                if let Err(e) = self.serial.enqueue_input(&buf[..n]) {
                    log::warn!("serial input dropped: {e}");
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(libc::STDIN_FILENO, EventSet::IN)) {
            // /dev/null or a closed stdin cannot be polled: the guest just gets no input.
            log::debug!("not forwarding stdin to the serial port: {e}");
        }
    }
}

/// Runs `vm` until a device ends it, a vCPU stops, or a vCPU fails; then stops every
/// vCPU and reports how it ended.
pub fn run_vm(mut vm: Vm, signals: Option<std::fs::File>) -> Result<RunReport, RunError> {
    let loop_err = |e: &dyn std::fmt::Display| RunError::EventLoop(e.to_string());
    let vcpu_done = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| loop_err(&e))?;
    let mut running: Vec<RunningVcpu> = Vec::with_capacity(vm.vcpus.len());
    for vcpu in vm.vcpus.drain(..) {
        let done = vcpu_done.try_clone().map_err(|e| loop_err(&e))?;
        match vcpu.spawn(Some(done)) {
            Ok(r) => running.push(r),
            Err(e) => {
                stop_all(&running);
                return Err(e.into());
            }
        }
    }

    let ended = Rc::new(Cell::new(false));
    let mut events: EventManager<Box<dyn MutEventSubscriber>> =
        EventManager::new().map_err(|e| loop_err(&e))?;
    events.add_subscriber(Box::new(EndWatcher {
        exit_fd: vm.exit.event_fd().as_raw_fd(),
        vcpu_done,
        ended: ended.clone(),
    }));
    let received = Rc::new(Cell::new(None));
    if let Some(signals) = signals {
        events.add_subscriber(Box::new(SignalWatcher {
            signals,
            ended: ended.clone(),
            received: received.clone(),
        }));
    }
    if vm.serial_stdin {
        events.add_subscriber(Box::new(StdinToSerial {
            serial: vm.serial.clone(),
        }));
    }
    while !ended.get() {
        if let Err(e) = events.run() {
            stop_all(&running);
            return Err(loop_err(&e));
        }
    }

    stop_all(&running);
    let mut exits = vec![0u64; ExitKind::ALL.len()];
    let mut outcomes = Vec::with_capacity(running.len());
    for r in running {
        for (i, kind) in ExitKind::ALL.iter().enumerate() {
            exits[i] += r.stats().get(*kind);
        }
        let index = r.index();
        outcomes.push((index, r.join()));
    }
    let exits = ExitKind::ALL
        .iter()
        .copied()
        .zip(exits)
        .filter(|&(_, n)| n > 0)
        .collect();
    let (pio, mmio) = (vm.pio.stats(), vm.mmio.stats());
    let unclaimed = format!(
        "PIO {} reads, {} writes; MMIO {} reads, {} writes; {} bad widths",
        pio.unclaimed_reads,
        pio.unclaimed_writes,
        mmio.unclaimed_reads,
        mmio.unclaimed_writes,
        pio.bad_widths + mmio.bad_widths
    );

    if let Some(signo) = received.get() {
        let name = if signo == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        return Ok(RunReport {
            exit_code: 128 + signo,
            reason: format!("stopped by {name}"),
            exits,
            unclaimed,
        });
    }
    // A device's request wins: it is what the guest asked for.
    if let Some(request) = vm.exit.requested() {
        let (exit_code, reason) = match request {
            ExitRequest::DebugExit(code) => (
                i32::from(code),
                format!("guest wrote {code} to the debug-exit port"),
            ),
            ExitRequest::Reset => (0, "guest reset the machine through the i8042".to_string()),
        };
        return Ok(RunReport {
            exit_code,
            reason,
            exits,
            unclaimed,
        });
    }
    // Otherwise the first vCPU that ended by itself says why.
    for (index, outcome) in outcomes {
        match outcome? {
            VcpuOutcome::Stopped => continue,
            VcpuOutcome::Halted => {
                return Ok(RunReport {
                    exit_code: 0,
                    reason: format!("vCPU {index} halted"),
                    exits,
                    unclaimed,
                })
            }
            VcpuOutcome::Shutdown => return Err(RunError::TripleFault(index)),
            VcpuOutcome::SystemEvent(SystemEvent::Crash) => {
                return Err(RunError::GuestCrash(index))
            }
            VcpuOutcome::SystemEvent(event) => {
                return Ok(RunReport {
                    exit_code: 0,
                    reason: format!("guest system event {event:?}"),
                    exits,
                    unclaimed,
                })
            }
        }
    }
    Ok(RunReport {
        exit_code: 0,
        reason: "stopped".to_string(),
        exits,
        unclaimed,
    })
}

fn stop_all(running: &[RunningVcpu]) {
    for r in running {
        r.stop();
    }
}
