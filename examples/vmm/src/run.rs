//! Runs a built VM: one thread per vCPU, and this thread's event loop for everything
//! else (serial input, devices asking to end the VM, vCPUs ending).
//!
//! Nothing here waits on the guest's console output: the serial port writes it from a
//! thread of its own behind a bounded buffer (`ember_devices::SerialOutput`), so a
//! reader that stops reading `ember`'s stdout costs guest output (dropped, counted and
//! reported), never a stalled vCPU or event loop. SIGINT and SIGTERM end the VM at once
//! whatever the guest or that reader do: the buffered output is then abandoned, and the
//! writer thread, maybe stuck in `write(2)`, is left to the process's exit.
//!
//! `ember`'s log lines are treated the same way (see [`crate::logger`]): while the VM
//! runs, no thread waits for stderr; when it ends, the buffered lines are written like
//! the console's last output, and given up on at once on a signal.

use std::cell::Cell;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_devices::{ExitRequest, Serial};
use ember_vcpu::{
    ExitKind, ExitProfile, RunningVcpu, SystemEvent, UnhandledExit, VcpuError, VcpuGroup,
    VcpuOutcome,
};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::api::ApiRequests;
use crate::builder::Vm;
use crate::console::{ConsoleEvent, EscapeParser, RawTerminal};
use crate::control::Control;
use crate::logger::write_stderr;

/// Once the VM has ended, how long its buffered console output may go without any of
/// it being written before `ember` gives up on it (a reader that stopped reading).
const OUTPUT_STALL: Duration = Duration::from_secs(2);
/// While waiting for that output, how often SIGINT/SIGTERM are looked for.
const SIGNAL_POLL: Duration = Duration::from_millis(10);
/// After SIGINT/SIGTERM, how long the last log lines (how the VM ended) may wait for a
/// stderr that is not taking them.
const SIGNAL_GRACE: Duration = Duration::from_millis(20);

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
    /// A vCPU exited for a reason this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected KVM exit {exit}")]
    UnhandledExit {
        /// vCPU index.
        vcpu: u32,
        /// The exit.
        exit: UnhandledExit,
    },
    /// The main thread's seccomp filter could not be installed.
    #[error("{0}")]
    Seccomp(crate::seccomp::SeccompError),
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
    /// [`VcpuGroup::ended_event`].
    vcpus_ended: i32,
    ended: Rc<Cell<bool>>,
}

/// Ends the VM on SIGINT or SIGTERM, read from a signalfd.
struct SignalWatcher {
    signals: Rc<File>,
    ended: Rc<Cell<bool>>,
    received: Rc<Cell<Option<i32>>>,
}

/// Reads one signal from the (non-blocking) signalfd `signals`, if one is pending.
pub fn read_signal(mut signals: &File) -> Option<i32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    match signals.read(&mut info) {
        // ssi_signo is the first field, a u32.
        Ok(n) if n == info.len() => {
            Some(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32)
        }
        _ => None,
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(signo) = read_signal(&self.signals) {
            self.received.set(Some(signo));
        }
        self.ended.set(true);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.signals, EventSet::IN)) {
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
        for fd in [self.exit_fd, self.vcpus_ended] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch fd {fd}: {e}");
                self.ended.set(true);
            }
        }
    }
}

/// Wakes the loop when the API thread has a request (see [`ApiRequests`]).
struct ApiWatcher {
    fd: i32,
    pending: Rc<Cell<bool>>,
}

impl MutEventSubscriber for ApiWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes from the API's (nonblocking) eventfd into `count`.
        let _ = unsafe { libc::read(self.fd, count.as_mut_ptr().cast(), count.len()) };
        self.pending.set(true);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            log::error!("cannot watch the API socket's requests: {e}");
        }
    }
}

/// Feeds standard input to the serial port; on a terminal, through the console's
/// escape parser (Ctrl-A x ends the VM).
struct StdinToSerial {
    serial: Arc<Serial>,
    /// Set when stdin is a terminal in raw mode.
    escape: Option<EscapeParser>,
    ended: Rc<Cell<bool>>,
    quit: Rc<Cell<bool>>,
}

impl StdinToSerial {
    fn send(&self, bytes: &[u8]) {
        if let Err(e) = self.serial.enqueue_input(bytes) {
            ember_rate_limiter::warn_limited!("serial input dropped: {e}");
        }
    }
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
                let Some(parser) = self.escape.as_mut() else {
                    self.send(&buf[..n]);
                    return;
                };
                for event in parser.feed(&buf[..n]) {
                    match event {
                        ConsoleEvent::Guest(bytes) => self.send(&bytes),
                        ConsoleEvent::Help => write_stderr(crate::console::HELP),
                        ConsoleEvent::Quit => {
                            self.quit.set(true);
                            self.ended.set(true);
                            let _ = ops.remove(events);
                            return;
                        }
                    }
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
/// vCPU and reports how it ended. Once the vCPUs have run, `profile` holds their exit
/// counts (and latency histograms, if exit timing was on) merged, whether the VM ended
/// well or not.
pub fn run_vm(
    mut vm: Vm,
    signals: Option<std::fs::File>,
    profile: &mut ExitProfile,
    api: Option<&ApiRequests>,
    start_paused: bool,
) -> Result<RunReport, RunError> {
    let loop_err = |e: &dyn std::fmt::Display| RunError::EventLoop(e.to_string());
    // From here until the VM has ended, no thread waits for stderr. (On an early return,
    // dropping it waits, bounded, for the lines logged meanwhile.)
    let buffering = crate::logger::buffer();
    // On every early return below, dropping `vcpus` stops and joins the vCPUs.
    let mut vcpus = VcpuGroup::new()?;
    for (i, vcpu) in vm.vcpus.drain(..).enumerate() {
        // The boot vCPU's thread starts on this CPU (see `LocalStart`).
        let local = if i == 0 { LocalStart::begin() } else { None };
        let spawned = vcpus.spawn(vcpu);
        if let Some(local) = local {
            local.end(spawned.as_ref().ok().copied());
        }
        spawned?;
    }

    if start_paused {
        vcpus.pause_all()?;
        for transport in &vm.transports {
            transport
                .pause()
                .map_err(|e| RunError::EventLoop(format!("cannot pause a virtio device: {e}")))?;
        }
    }

    let ended = Rc::new(Cell::new(false));
    let mut events: EventManager<Box<dyn MutEventSubscriber>> =
        EventManager::new().map_err(|e| loop_err(&e))?;
    let api_pending = Rc::new(Cell::new(false));
    if let Some(api) = api {
        events.add_subscriber(Box::new(ApiWatcher {
            fd: api.event_fd().as_raw_fd(),
            pending: api_pending.clone(),
        }));
    }
    events.add_subscriber(Box::new(EndWatcher {
        exit_fd: vm.exit.event_fd().as_raw_fd(),
        vcpus_ended: vcpus.ended_event().as_raw_fd(),
        ended: ended.clone(),
    }));
    let received = Rc::new(Cell::new(None));
    let signals = signals.map(Rc::new);
    if let Some(signals) = &signals {
        events.add_subscriber(Box::new(SignalWatcher {
            signals: signals.clone(),
            ended: ended.clone(),
            received: received.clone(),
        }));
    }
    // Raw mode until the loop ends; dropping `terminal` (on every return below, and
    // before `main` prints anything) restores the terminal.
    let terminal = vm.serial_stdin.then(RawTerminal::stdin).flatten();
    let quit = Rc::new(Cell::new(false));
    if vm.serial_stdin {
        events.add_subscriber(Box::new(StdinToSerial {
            serial: vm.serial.clone(),
            escape: terminal.as_ref().map(|_| EscapeParser::new()),
            ended: ended.clone(),
            quit: quit.clone(),
        }));
    }
    // The vCPU threads exist (they must not inherit this thread's filter) and the loop
    // is set up: from here on this thread runs under its seccomp filter.
    let kind = if api.is_some() {
        crate::seccomp::ThreadKind::MainApi
    } else {
        crate::seccomp::ThreadKind::Main
    };
    crate::seccomp::enter(kind).map_err(RunError::Seccomp)?;
    {
        let mut control = Control::new(&vm, &vcpus, start_paused);
        while !ended.get() {
            events.run().map_err(|e| loop_err(&e))?;
            if let (true, Some(api)) = (api_pending.replace(false), api) {
                while let Some((request, responder)) = api.try_recv() {
                    responder.reply(control.handle(request));
                }
            }
        }
    }
    drop(terminal);

    let results = vcpus.join();
    // The vCPUs are gone: no more guest output. Write what is buffered (console output
    // and log lines), unless a signal asks to end now.
    if received.get().is_some() {
        vm.serial.abandon_output();
        crate::logger::give_up(SIGNAL_GRACE);
    } else if let Some(signo) = finish_output(&vm.serial, signals.as_deref()) {
        log::info!("signal {signo} while writing the guest's last output: the rest is dropped");
    }
    // Log lines are waited for again (bounded), so that the last ones are out before
    // `ember` exits.
    buffering.end();
    report_output(&vm.serial, vm.serial_stdin);
    let mut merged = ExitProfile::default();
    let mut outcomes = Vec::with_capacity(results.len());
    for vcpu in results {
        // After the join, the counters are final.
        merged.merge(&vcpu.stats.profile());
        outcomes.push((vcpu.index, vcpu.result));
    }
    // `ember` exits right after this: leave the VM to the process's exit, which frees it
    // in one go, instead of deleting its memory slots first; guest RAM then also stays
    // mapped to the end for tools that read an exiting process's memory maps (the
    // exit-rate benchmark's footprint).
    std::mem::forget(vm.vm);
    let exits = ExitKind::ALL
        .iter()
        .map(|&k| (k, merged.count(k)))
        .filter(|&(_, n)| n > 0)
        .collect();
    *profile = merged;
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
    if quit.get() {
        // QEMU prints "QEMU: Terminated" and exits with 0.
        write_stderr("ember: terminated (Ctrl-A x)\n");
        return Ok(RunReport {
            exit_code: 0,
            reason: "quit from the console (Ctrl-A x)".to_string(),
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
            ExitRequest::Reset => (
                0,
                "guest reset the machine (i8042 or ACPI reset register)".to_string(),
            ),
            ExitRequest::PowerOff => (0, "guest powered off (ACPI S5)".to_string()),
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
            VcpuOutcome::Unhandled(exit) => {
                return Err(RunError::UnhandledExit { vcpu: index, exit })
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

/// Waits for the serial port's buffered output and the buffered log lines to be
/// written, giving up on both (and returning the signal) on SIGINT or SIGTERM, or once
/// neither made progress for [`OUTPUT_STALL`].
fn finish_output(serial: &Serial, signals: Option<&File>) -> Option<i32> {
    let pending = || (serial.pending_output(), crate::logger::pending());
    let (mut console, mut log) = pending();
    let mut progress = Instant::now();
    loop {
        let console_done = serial.flush_output(SIGNAL_POLL);
        // Waits only when the console did not.
        let wait = if console_done {
            SIGNAL_POLL
        } else {
            Duration::ZERO
        };
        if crate::logger::flush(wait) && console_done {
            return None;
        }
        if let Some(signo) = signals.and_then(read_signal) {
            serial.abandon_output();
            crate::logger::give_up(SIGNAL_GRACE);
            return Some(signo);
        }
        let (console_now, log_now) = pending();
        if console_now < console || log_now < log {
            (console, log) = (console_now, log_now);
            progress = Instant::now();
        } else if progress.elapsed() >= OUTPUT_STALL {
            if console_now > 0 {
                serial.abandon_output();
            }
            if log_now > 0 {
                crate::logger::give_up(Duration::ZERO);
            }
            log::debug!(
                "console and log: nothing written for {OUTPUT_STALL:?}; giving up on \
                 {console_now} bytes of guest output and {log_now} bytes of log lines"
            );
            return None;
        }
    }
}

/// Reports guest output that did not reach its destination.
fn report_output(serial: &Serial, stdio: bool) {
    let stats = serial.stats();
    if stats.bytes_dropped > 0 {
        let why = if stdio {
            "nobody was reading stdout"
        } else {
            "the output did not keep up"
        };
        log::warn!(
            "console: {} bytes of guest output dropped ({why})",
            stats.bytes_dropped
        );
    }
    if stats.bytes_lost > 0 {
        log::warn!(
            "console: {} bytes of guest output lost to write errors",
            stats.bytes_lost
        );
    }
    if stats.bytes_over_limit > 0 {
        log::info!(
            "console: {} bytes of guest output past the output file's size limit discarded",
            stats.bytes_over_limit
        );
    }
}

/// Starts a thread on the CPU this thread runs on, rather than on another, idle one.
///
/// A new thread normally goes to the idlest CPU, and waking an idle CPU can take
/// milliseconds where the host is itself a virtual machine (the wake-up is an IPI to a
/// halted vCPU of the host's own hypervisor): on the nested development host the boot
/// vCPU's thread made its first system call 0.1 to 6 ms after `clone`. Started here
/// instead, it runs as soon as this thread blocks in the event loop, a moment later:
/// the median time to the guest's first instruction fell from 7.3 to 3.2 ms, and from
/// 5.4 to 3.3 ms, in two sets of 30 interleaved runs (host load 4). So the spawning
/// thread's affinity is narrowed to its
/// current CPU while it spawns (the new thread inherits that), then both are given the
/// full set back, which leaves the queued thread where it is until the scheduler next
/// balances.
struct LocalStart {
    all: libc::cpu_set_t,
}

impl LocalStart {
    /// Narrows this thread's affinity to its current CPU; `None` (and nothing changed)
    /// if that cannot be done.
    fn begin() -> Option<LocalStart> {
        // SAFETY: zero is a valid cpu_set_t; the calls read or write only the sets
        // given, with their real sizes, and change this thread's affinity.
        unsafe {
            let mut all: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of_val(&all), &mut all) != 0 {
                return None;
            }
            let cpu = usize::try_from(libc::sched_getcpu()).ok()?;
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut one);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) != 0 {
                return None;
            }
            Some(LocalStart { all })
        }
    }

    /// Gives this thread, and `spawned` if given, the original affinity back.
    fn end(self, spawned: Option<&RunningVcpu>) {
        let size = std::mem::size_of_val(&self.all);
        // SAFETY: the sets are valid for `size` bytes; the pthread handle is live (the
        // thread has not been joined).
        unsafe {
            if let Some(vcpu) = spawned {
                let rc = libc::pthread_setaffinity_np(vcpu.as_pthread_t(), size, &self.all);
                if rc != 0 {
                    log::warn!(
                        "vCPU {}: cannot widen its CPU affinity: error {rc}",
                        vcpu.index()
                    );
                }
            }
            if libc::sched_setaffinity(0, size, &self.all) != 0 {
                log::warn!(
                    "cannot restore the VMM thread's CPU affinity: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
