//! [`VcpuGroup`]: a VM's vCPUs, each on its own thread, ended together.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vmm_sys_util::eventfd::EventFd;

use crate::state::VcpuState;
use crate::{ExitStats, RunningVcpu, Vcpu, VcpuError, VcpuOutcome};

/// The vCPUs of a VM, each running on its own thread ([`Vcpu::spawn`]), and what a VMM
/// does with them once the VM is to end: stop every one, join every thread, collect
/// how each ended.
///
/// Any vCPU's run loop ending is a VM-ending event (a halt, a triple fault, a system
/// event, an error, an [unhandled exit](crate::VcpuOutcome::Unhandled)); so is any
/// event the VMM passes to [`VcpuGroup::wait`], such as the eventfd its devices signal
/// when the guest asks to power off (`ember_devices::ExitSignal::event_fd`). A VMM
/// with an event loop of its own watches [`VcpuGroup::ended_event`] there instead of
/// calling `wait`.
///
/// Dropping the group stops and joins whatever still runs.
///
/// ```no_run
/// # fn vm_vcpus() -> (Vec<ember_vcpu::Vcpu>, vmm_sys_util::eventfd::EventFd) { unimplemented!() }
/// use ember_vcpu::{GroupEvent, VcpuGroup};
///
/// let (vcpus, power_off) = vm_vcpus();
/// let group = VcpuGroup::start(vcpus)?;
/// match group.wait(&[&power_off])? {
///     GroupEvent::VcpuEnded => println!("a vCPU ended the VM"),
///     GroupEvent::Stop(_) => println!("a device ended the VM"),
/// }
/// for vcpu in group.join() {
///     println!("vCPU {}: {:?} after {} exits", vcpu.index, vcpu.result, vcpu.stats.total());
/// }
/// # Ok::<(), ember_vcpu::VcpuError>(())
/// ```
#[derive(Debug)]
pub struct VcpuGroup {
    vcpus: Vec<RunningVcpu>,
    /// Written by each vCPU thread as its run loop ends; never read, so it stays
    /// readable once any has.
    ended: EventFd,
}

/// How one vCPU of a [`VcpuGroup`] ended.
#[derive(Debug)]
pub struct VcpuResult {
    /// The vCPU's index.
    pub index: u32,
    /// How its run loop ended: [`VcpuOutcome::Stopped`] for those the group stopped.
    pub result: Result<VcpuOutcome, VcpuError>,
    /// Its exit counters, final.
    pub stats: Arc<ExitStats>,
}

/// What ended [`VcpuGroup::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupEvent {
    /// A vCPU's run loop ended (or the group has no vCPUs).
    VcpuEnded,
    /// The stop event at this position in `wait`'s list became readable.
    Stop(usize),
}

impl VcpuGroup {
    /// An empty group; add vCPUs with [`VcpuGroup::spawn`].
    pub fn new() -> Result<Self, VcpuError> {
        let ended =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VcpuError::EventFd)?;
        Ok(VcpuGroup {
            vcpus: Vec::new(),
            ended,
        })
    }

    /// A group running every vCPU of `vcpus`. If one cannot be spawned, those already
    /// running are stopped and joined, and the error returned.
    pub fn start<B>(vcpus: impl IntoIterator<Item = Vcpu<B>>) -> Result<Self, VcpuError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let mut group = VcpuGroup::new()?;
        for vcpu in vcpus {
            group.spawn(vcpu)?;
        }
        Ok(group)
    }

    /// Runs `vcpu` on a thread of its own ([`Vcpu::spawn`]) as part of the group, and
    /// returns it running (for its thread's CPU affinity, say).
    pub fn spawn<B>(&mut self, vcpu: Vcpu<B>) -> Result<&RunningVcpu, VcpuError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let index = vcpu.index();
        let done = self.ended.try_clone().map_err(VcpuError::EventFd)?;
        let running = vcpu.spawn(Some(done))?;
        log::debug!("vCPU {index} running");
        self.vcpus.push(running);
        Ok(&self.vcpus[self.vcpus.len() - 1])
    }

    /// The running vCPUs, in the order they were spawned.
    pub fn vcpus(&self) -> &[RunningVcpu] {
        &self.vcpus
    }

    /// An eventfd that becomes readable once any vCPU's run loop has ended, for a VMM
    /// that waits in an event loop of its own. Leave its counter alone: [`VcpuGroup::wait`]
    /// relies on it.
    pub fn ended_event(&self) -> &EventFd {
        &self.ended
    }

    /// Blocks until a vCPU's run loop has ended (returning at once if one already has)
    /// or one of `stop_events` is readable, and says which. Reads nothing from either.
    pub fn wait(&self, stop_events: &[&dyn AsRawFd]) -> Result<GroupEvent, VcpuError> {
        if self.vcpus.is_empty() {
            return Ok(GroupEvent::VcpuEnded);
        }
        let watch = |fd: RawFd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds: Vec<libc::pollfd> = std::iter::once(self.ended.as_raw_fd())
            .chain(stop_events.iter().map(|e| e.as_raw_fd()))
            .map(watch)
            .collect();
        loop {
            // SAFETY: `fds` is a live array of `fds.len()` pollfd structs, which poll
            // only reads and whose `revents` it writes.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VcpuError::Wait(err));
            }
            let ready = |p: &libc::pollfd| p.revents != 0;
            if fds.first().is_some_and(ready) {
                return Ok(GroupEvent::VcpuEnded);
            }
            if let Some(i) = fds.iter().skip(1).position(ready) {
                return Ok(GroupEvent::Stop(i));
            }
        }
    }

    /// Asks every vCPU to stop and kicks it out of `KVM_RUN` ([`RunningVcpu::stop`]);
    /// returns at once.
    pub fn stop(&self) {
        for vcpu in &self.vcpus {
            vcpu.stop();
        }
    }

    /// Pauses every vCPU ([`RunningVcpu::pause`]): asks them all first, then waits for
    /// each to park. Paused vCPUs do not count as ended ([`VcpuGroup::wait`] and
    /// [`VcpuGroup::ended_event`] do not see them). Fails, leaving the others paused, if
    /// a vCPU's run loop has ended.
    ///
    /// ```no_run
    /// # fn f(group: &ember_vcpu::VcpuGroup) -> Result<(), ember_vcpu::VcpuError> {
    /// group.pause_all()?;
    /// let states = group.save_states()?;
    /// group.resume_all();
    /// # Ok(()) }
    /// ```
    pub fn pause_all(&self) -> Result<(), VcpuError> {
        for vcpu in &self.vcpus {
            vcpu.request_pause();
        }
        for vcpu in &self.vcpus {
            vcpu.wait_paused()?;
        }
        Ok(())
    }

    /// Lets every paused vCPU go on ([`RunningVcpu::resume`]).
    pub fn resume_all(&self) {
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
    }

    /// The state of every vCPU ([`RunningVcpu::save_state`]), in the order they were
    /// spawned; they must be paused ([`VcpuGroup::pause_all`]).
    pub fn save_states(&self) -> Result<Vec<VcpuState>, VcpuError> {
        self.vcpus.iter().map(RunningVcpu::save_state).collect()
    }

    /// Stops every vCPU, waits for every thread, and returns how each ended, in the
    /// order they were spawned.
    pub fn join(mut self) -> Vec<VcpuResult> {
        self.stop_and_join()
    }

    /// [`VcpuGroup::wait`] for the first VM-ending event, then [`VcpuGroup::join`]:
    /// the whole life of the vCPUs in one call.
    pub fn run(
        self,
        stop_events: &[&dyn AsRawFd],
    ) -> Result<(GroupEvent, Vec<VcpuResult>), VcpuError> {
        let event = self.wait(stop_events)?;
        Ok((event, self.join()))
    }

    fn stop_and_join(&mut self) -> Vec<VcpuResult> {
        self.stop();
        self.vcpus
            .drain(..)
            .map(|vcpu| {
                let index = vcpu.index();
                let stats = vcpu.shared_stats();
                VcpuResult {
                    index,
                    result: vcpu.join(),
                    stats,
                }
            })
            .collect()
    }
}

impl Drop for VcpuGroup {
    fn drop(&mut self) {
        // No vCPU thread outlives its group.
        for vcpu in self.stop_and_join() {
            if let Err(e) = vcpu.result {
                log::warn!("vCPU {}: {e}", vcpu.index);
            }
        }
    }
}
