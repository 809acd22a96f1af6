//! What the API socket may do to a VM: before it exists ([`PreBootConfig`]: configure it, start
//! it, or load a snapshot into it) and while it runs ([`Control`]: pause, resume,
//! snapshot, Ctrl-Alt-Del, describe it).
//!
//! Requests come from the API thread ([`crate::api`]) one at a time; each is answered
//! before the next is taken, as Firecracker does.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ember_vcpu::VcpuGroup;

use crate::api::{ApiReply, ApiRequest, ApiRequests, InstanceInfo, InstanceState, PreBootConfig};
use crate::builder::{self, Vm};
use crate::config::{KernelSource, VmConfig};
use crate::snapshot::{self, PausedVm, SnapshotKind};

/// How long a pause waits for the console output the guest wrote before it: bounded,
/// so that a console nobody reads does not hold up the pause.
const PAUSE_CONSOLE_FLUSH: Duration = Duration::from_millis(100);

/// The instance ID `GET /` reports (Firecracker's default when `--id` is not given).
pub const INSTANCE_ID: &str = "anonymous-instance";

/// How the VM came to be, when the API started it.
pub enum Started {
    /// Built from the configuration and booted (`InstanceStart`).
    Booted(Vm),
    /// Restored from a snapshot (`PUT /snapshot/load`); runs at once when `resume` says
    /// so, else starts paused.
    Restored {
        /// The VM.
        vm: Vm,
        /// Whether to resume it at once.
        resume: bool,
    },
    /// SIGINT or SIGTERM came first.
    Signal(i32),
}

/// Serves the API until the VM is started or restored (or a signal ends `ember`).
pub fn pre_boot(
    requests: &ApiRequests,
    base: VmConfig,
    signals: Option<&File>,
    start: Instant,
) -> Result<Started, String> {
    let mut config = PreBootConfig::new(base);
    loop {
        wait_readable(
            requests.event_fd().as_raw_fd(),
            signals.map(|s| s.as_raw_fd()),
        )?;
        if let Some(signo) = signals.and_then(crate::run::read_signal) {
            return Ok(Started::Signal(signo));
        }
        while let Some((request, responder)) = requests.try_recv() {
            if let Some(reply) = config.handle(&request) {
                responder.reply(reply);
                continue;
            }
            match request {
                ApiRequest::GetInstanceInfo => responder.reply(ApiReply::Json(
                    InstanceInfo::new(INSTANCE_ID, InstanceState::NotStarted).to_json(),
                )),
                ApiRequest::InstanceStart if config.base().kernel == KernelSource::Demo => {
                    // Firecracker's rule; `ember` without --api-sock runs its demo guest.
                    responder.reply(ApiReply::bad_request(
                        "cannot start the microVM without a kernel: PUT /boot-source first",
                    ))
                }
                ApiRequest::InstanceStart => {
                    let vm_config = match config.finish() {
                        Ok(c) => c,
                        Err(message) => {
                            responder.reply(ApiReply::bad_request(message));
                            continue;
                        }
                    };
                    match builder::build_vm(&vm_config, start) {
                        Ok(vm) => {
                            responder.reply(ApiReply::NoContent);
                            return Ok(Started::Booted(vm));
                        }
                        Err(e) => responder
                            .reply(ApiReply::bad_request(format!("cannot start the VM: {e}"))),
                    }
                }
                ApiRequest::LoadSnapshot(load) => {
                    let base = config.base();
                    match restore(
                        &load.snapshot_path,
                        &load.mem_file_path,
                        base,
                        load.track_dirty_pages,
                        start,
                    ) {
                        Ok(vm) => {
                            responder.reply(ApiReply::NoContent);
                            return Ok(Started::Restored {
                                vm,
                                resume: load.resume_vm,
                            });
                        }
                        Err(message) => responder.reply(ApiReply::bad_request(message)),
                    }
                }
                ApiRequest::Pause
                | ApiRequest::Resume
                | ApiRequest::CreateSnapshot(_)
                | ApiRequest::SendCtrlAltDel => responder.reply(ApiReply::bad_request(
                    "the microVM is not started: InstanceStart or PUT /snapshot/load first",
                )),
                _ => responder.reply(ApiReply::bad_request(
                    "this request is not supported before the microVM starts",
                )),
            }
        }
    }
}

/// Restores the snapshot at `state_path` with its memory file `mem_path`. The console
/// and exit statistics are this process's (`base`), everything else the snapshot's.
pub fn restore(
    state_path: &std::path::Path,
    mem_path: &std::path::Path,
    base: &VmConfig,
    track_dirty_pages: bool,
    start: Instant,
) -> Result<Vm, String> {
    let (state, memory) = snapshot::load_state(state_path, mem_path)
        .map_err(|e| format!("cannot load the snapshot: {e}"))?;
    let mut config = state.config.clone();
    config.serial = base.serial.clone();
    config.exit_stats = base.exit_stats;
    config.track_dirty_pages = track_dirty_pages || base.track_dirty_pages;
    log::info!(
        "restoring a {:?} snapshot written by ember {}: {} vCPUs, {} MiB",
        state.kind,
        state.ember_version,
        config.vcpus,
        config.memory_bytes >> 20
    );
    builder::restore_vm(&config, &state, &memory, start)
        .map_err(|e| format!("cannot restore the snapshot: {e}"))
}

/// Blocks until `fd` or `other` is readable.
fn wait_readable(fd: i32, other: Option<i32>) -> Result<(), String> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: other.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a live array of two pollfd structs; poll ignores negative fds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("waiting for API requests: {err}"));
        }
    }
}

/// A running (or paused) VM as the API sees it.
pub struct Control<'a> {
    vm: &'a Vm,
    vcpus: &'a VcpuGroup,
    paused: bool,
}

impl<'a> Control<'a> {
    /// Control of `vm`, whose vCPUs run in `vcpus`; `paused` if they start paused.
    pub fn new(vm: &'a Vm, vcpus: &'a VcpuGroup, paused: bool) -> Self {
        Control { vm, vcpus, paused }
    }

    /// Answers one request.
    pub fn handle(&mut self, request: ApiRequest) -> ApiReply {
        match request {
            ApiRequest::GetInstanceInfo => {
                let state = if self.paused {
                    InstanceState::Paused
                } else {
                    InstanceState::Running
                };
                ApiReply::Json(InstanceInfo::new(INSTANCE_ID, state).to_json())
            }
            ApiRequest::GetVmConfig => {
                ApiReply::Json(PreBootConfig::new(self.vm.config.clone()).full_config())
            }
            ApiRequest::GetMachineConfig => {
                ApiReply::Json(PreBootConfig::new(self.vm.config.clone()).machine_config())
            }
            ApiRequest::Pause => match self.pause() {
                Ok(()) => ApiReply::NoContent,
                Err(message) => ApiReply::bad_request(message),
            },
            ApiRequest::Resume => match self.resume() {
                Ok(()) => ApiReply::NoContent,
                Err(message) => ApiReply::bad_request(message),
            },
            ApiRequest::CreateSnapshot(create) => {
                let kind = match create.snapshot_type {
                    crate::api::SnapshotType::Full => SnapshotKind::Full,
                    crate::api::SnapshotType::Diff => SnapshotKind::Diff,
                };
                match self.snapshot(kind, &create.snapshot_path, &create.mem_file_path) {
                    Ok(()) => ApiReply::NoContent,
                    Err(message) => ApiReply::bad_request(message),
                }
            }
            ApiRequest::SendCtrlAltDel => match self.vm.i8042.trigger_ctrl_alt_del() {
                Ok(()) => ApiReply::NoContent,
                Err(e) => ApiReply::bad_request(format!("cannot send Ctrl-Alt-Del: {e}")),
            },
            ApiRequest::LoadSnapshot(_) => ApiReply::bad_request(
                "a snapshot can only be loaded into a new ember (one started with --api-sock and no --kernel)",
            ),
            ApiRequest::InstanceStart => {
                ApiReply::bad_request("the microVM is already running")
            }
            ApiRequest::PutMachineConfig(_)
            | ApiRequest::PutBootSource(_)
            | ApiRequest::PutDrive(_)
            | ApiRequest::PutNetworkInterface(_)
            | ApiRequest::PutEntropy(_) => ApiReply::bad_request(
                "the microVM is running: its configuration can only be changed before InstanceStart",
            ),
        }
    }

    /// Pauses the VM: every vCPU out of `KVM_RUN` and parked, then every device worker
    /// stopped after the request it is serving (the queues keep their positions), then
    /// the console output written out (waiting at most `PAUSE_CONSOLE_FLUSH`).
    pub fn pause(&mut self) -> Result<(), String> {
        if self.paused {
            return Ok(());
        }
        let started = Instant::now();
        self.vcpus
            .pause_all()
            .map_err(|e| format!("cannot pause the vCPUs: {e}"))?;
        for transport in &self.vm.transports {
            if let Err(e) = transport.pause() {
                // Leave the VM as it was: running.
                for t in &self.vm.transports {
                    let _ = t.resume();
                }
                self.vcpus.resume_all();
                return Err(format!("cannot pause a virtio device: {e}"));
            }
        }
        self.paused = true;
        // Everything the guest printed before the pause is written when the pause is
        // reported, so a reader of the console sees where it stopped and a snapshot
        // followed by a kill loses none of it.
        if !self.vm.serial.flush_output(PAUSE_CONSOLE_FLUSH) {
            log::info!(
                "VM paused with {} bytes of console output not written yet (the console is not taking it)",
                self.vm.serial.pending_output()
            );
        }
        log::info!(
            "VM paused in {:.3} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Resumes a paused VM: device workers first, so that the vCPUs find them serving.
    pub fn resume(&mut self) -> Result<(), String> {
        if !self.paused {
            return Ok(());
        }
        for transport in &self.vm.transports {
            transport
                .resume()
                .map_err(|e| format!("cannot resume a virtio device: {e}"))?;
        }
        self.vcpus.resume_all();
        self.paused = false;
        log::info!("VM resumed");
        Ok(())
    }

    /// Writes a snapshot of the paused VM.
    pub fn snapshot(
        &mut self,
        kind: SnapshotKind,
        state_path: &std::path::Path,
        mem_path: &std::path::Path,
    ) -> Result<(), String> {
        if !self.paused {
            return Err(snapshot::SnapshotError::NotPaused.to_string());
        }
        let vcpus = self
            .vcpus
            .save_states()
            .map_err(|e| format!("cannot save the vCPU states: {e}"))?;
        let report =
            snapshot::create_snapshot(PausedVm { vm: self.vm, vcpus }, kind, state_path, mem_path)
                .map_err(|e| e.to_string())?;
        log::info!(
            "{kind:?} snapshot written in {:.1} ms: {} ({} pages of memory in {})",
            report.millis,
            state_path.display(),
            report.pages,
            mem_path.display()
        );
        Ok(())
    }
}
