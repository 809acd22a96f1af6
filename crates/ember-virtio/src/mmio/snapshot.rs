//! Pause, resume, save and restore of a [`MmioTransport`] (see the methods' docs).

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;

use super::{
    status, Address, MmioTransport, QueueConfig, Registers, TransportError,
    INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER, MAX_QUEUE_SIZE,
};
use crate::device::{ActiveQueue, VIRTIO_F_VERSION_1};
use crate::state::{MmioQueueState, MmioTransportState, QueueState};
use crate::VIRTIO_RING_F_EVENT_IDX;

/// Every status bit a saved state may hold.
const KNOWN_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::FEATURES_OK
    | status::DRIVER_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

fn address_state(address: Address) -> Option<u64> {
    address.set.then_some(address.value)
}

fn address_from_state(value: Option<u64>) -> Address {
    Address {
        value: value.unwrap_or(0),
        set: value.is_some(),
    }
}

fn invalid(reason: String) -> TransportError {
    TransportError::RestoreInvalid(reason)
}

impl<M: GuestAddressSpace> MmioTransport<M> {
    /// Pauses the device: its worker stops after at most the request in flight, and
    /// the transport keeps the queues, positions included (chains still in the
    /// available rings stay there). A no-op if the device is not activated or already
    /// paused. Guest notifications that arrive while paused are served on
    /// [`resume`](Self::resume).
    ///
    /// Fails ([`TransportError::Pause`]) if the device does not implement
    /// [`VirtioDevice::pause`](crate::VirtioDevice::pause) (the error names its type),
    /// or its worker had panicked.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use ember_virtio::mmio::MmioTransport;
    /// # use ember_virtio::vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
    /// # use ember_virtio::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    /// # use ember_virtio::{ActivateDevice, ActivateError, Activation, VirtioDevice};
    /// # struct Quiet;
    /// # impl VirtioDevice for Quiet {
    /// #     fn device_type(&self) -> u32 { 4 }
    /// #     fn queue_max_sizes(&self) -> &[u16] { &[64] }
    /// #     fn device_features(&self) -> u64 { ember_virtio::VIRTIO_F_VERSION_1 }
    /// #     fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    /// #     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// #     fn reset(&mut self) {}
    /// # }
    /// # impl<M: GuestAddressSpace> ActivateDevice<M> for Quiet {
    /// #     fn activate(&mut self, _a: Activation<M>) -> Result<(), ActivateError> { Ok(()) }
    /// # }
    /// let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])?);
    /// let transport = MmioTransport::new(Box::new(Quiet), mem, EventFd::new(EFD_NONBLOCK)?)?;
    /// // Not activated yet: pausing and saving are allowed, and there is nothing to stop.
    /// transport.pause()?;
    /// let state = transport.save_state()?;
    /// assert!(!state.activated);
    /// transport.resume()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pause(&self) -> Result<(), TransportError> {
        let mut inner = self.lock();
        if !inner.regs.activated || inner.paused.is_some() {
            return Ok(());
        }
        let queues = inner.device.pause()?;
        inner.paused = Some(queues);
        Ok(())
    }

    /// Whether the device is paused ([`pause`](Self::pause) with no
    /// [`resume`](Self::resume) or reset since).
    pub fn is_paused(&self) -> bool {
        self.lock().paused.is_some()
    }

    /// Starts a paused device again with the queues it had, then kicks every queue so
    /// that chains added while it was paused are served. A no-op if not paused.
    ///
    /// If the device fails to start ([`TransportError::Start`]), the transport stays
    /// paused with its queues, so the state can still be saved.
    pub fn resume(&self) -> Result<(), TransportError> {
        let mut inner = self.lock();
        let Some(queues) = inner.paused.take() else {
            return Ok(());
        };
        let saved: Vec<(u16, QueueState)> = queues
            .iter()
            .map(|q| (q.index, QueueState::from(q.queue.state())))
            .collect();
        match self.start_device(&mut inner, queues) {
            Ok(()) => {
                drop(inner);
                self.kick(saved.iter().map(|&(index, _)| index));
                Ok(())
            }
            Err(reason) => {
                // The queues went to the device; rebuild them so the state survives.
                let rebuilt = saved
                    .iter()
                    .map(|&(index, state)| self.rebuild_queue(usize::from(index), &state))
                    .collect::<Result<Vec<_>, _>>();
                match rebuilt {
                    Ok(queues) => inner.paused = Some(queues),
                    Err(e) => log::error!(
                        "virtio-mmio: device type {}: the paused queues are lost: {e}",
                        self.device_type
                    ),
                }
                Err(TransportError::Start {
                    device_type: self.device_type,
                    reason,
                })
            }
        }
    }

    /// The transport's state: registers, interrupt status, configuration generation,
    /// and each queue with its ring positions. Requires the device to be paused, or
    /// not activated ([`TransportError::NotPaused`] otherwise).
    ///
    /// Of the device's own state it holds only the levels of its rate limiters
    /// ([`VirtioDevice::save_rate_limiters`](crate::VirtioDevice::save_rate_limiters)):
    /// the rest (a disk's path, a tap, a MAC address) is configuration, and a restore
    /// builds the same device again and gives it to a new transport.
    pub fn save_state(&self) -> Result<MmioTransportState, TransportError> {
        let mut inner = self.lock();
        if inner.regs.activated && inner.paused.is_none() {
            return Err(TransportError::NotPaused {
                device_type: self.device_type,
            });
        }
        let rate_limiters = inner.device.save_rate_limiters();
        let regs = &inner.regs;
        let mut queues: Vec<MmioQueueState> = regs
            .queues
            .iter()
            .map(|q| MmioQueueState {
                size: q.size,
                ready: q.ready,
                desc: address_state(q.desc),
                avail: address_state(q.driver),
                used: address_state(q.device),
                active: None,
            })
            .collect();
        for q in inner.paused.iter().flatten() {
            if let Some(saved) = queues.get_mut(usize::from(q.index)) {
                saved.active = Some(QueueState::from(q.queue.state()));
            }
        }
        Ok(MmioTransportState {
            device_type: self.device_type,
            queue_max_sizes: self.queue_max_sizes.clone(),
            status: regs.status,
            device_features_sel: regs.device_features_sel,
            driver_features_sel: regs.driver_features_sel,
            driver_features: regs.driver_features,
            queue_sel: regs.queue_sel,
            shm_sel: regs.shm_sel,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            config_generation: inner.config_generation(),
            activated: regs.activated,
            queues,
            rate_limiters,
        })
    }

    /// Restores `state` into this freshly built transport (same kind of device, before
    /// the guest runs): sets the registers, the interrupt status and the configuration
    /// generation, and if the saved device was activated, activates the device with
    /// its queues at the saved ring positions (validated against guest memory, as a
    /// driver's activation is) and kicks every queue, so that requests that were in the
    /// available rings when the device was paused are served. The device runs
    /// afterwards (it is not paused).
    ///
    /// Nothing changes if the state is refused: another device type
    /// ([`TransportError::RestoreDeviceType`]), queue count or maximum size, features
    /// the device does not offer, inconsistent registers, rings outside guest memory or
    /// rate limiter levels the device's limiters cannot take
    /// ([`TransportError::RestoreInvalid`]), a transport the driver already set up
    /// ([`TransportError::RestoreNotFresh`]), or a device that fails to start
    /// ([`TransportError::Start`]).
    pub fn restore_state(&self, state: &MmioTransportState) -> Result<(), TransportError> {
        let mut inner = self.lock();
        if inner.regs.status != 0 || inner.regs.activated || inner.paused.is_some() {
            return Err(TransportError::RestoreNotFresh {
                device_type: self.device_type,
                status: inner.regs.status,
                activated: inner.regs.activated,
            });
        }
        let regs = self.check_state(state)?;
        let mut queues = Vec::new();
        if state.activated {
            for (i, q) in state.queues.iter().enumerate() {
                if let Some(active) = &q.active {
                    queues.push(self.rebuild_queue(i, active).map_err(invalid)?);
                }
            }
        }
        // Validated whole before anything changes, and applied to a device that is not
        // running yet.
        inner
            .device
            .restore_rate_limiters(&state.rate_limiters)
            .map_err(|e| invalid(format!("rate limiters: {e}")))?;
        let indices: Vec<u16> = queues.iter().map(|q| q.index).collect();
        inner.regs = regs;
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        if state.activated {
            if let Err(reason) = self.start_device(&mut inner, queues) {
                inner.regs = Registers::new(self.queue_max_sizes.len());
                self.interrupt.status.store(0, Ordering::SeqCst);
                return Err(TransportError::Start {
                    device_type: self.device_type,
                    reason,
                });
            }
            self.activated.store(true, Ordering::Release);
        }
        inner.config_generation_offset = state
            .config_generation
            .wrapping_sub(inner.device.config_generation());
        drop(inner);
        self.kick(indices.into_iter());
        Ok(())
    }

    /// Checks `state` against this transport's device and returns its registers.
    fn check_state(&self, state: &MmioTransportState) -> Result<Registers, TransportError> {
        if state.device_type != self.device_type {
            return Err(TransportError::RestoreDeviceType {
                saved: state.device_type,
                actual: self.device_type,
            });
        }
        let count = self.queue_max_sizes.len();
        for (what, saved) in [
            ("queue_max_sizes", state.queue_max_sizes.len()),
            ("queues", state.queues.len()),
        ] {
            if saved != count {
                log::debug!("virtio-mmio restore: {what} has {saved} entries, expected {count}");
                return Err(TransportError::RestoreQueueCount {
                    saved,
                    actual: count,
                });
            }
        }
        for (index, (&saved, &actual)) in state
            .queue_max_sizes
            .iter()
            .zip(&self.queue_max_sizes)
            .enumerate()
        {
            if saved != actual {
                return Err(TransportError::RestoreQueueMaxSize {
                    index,
                    saved,
                    actual,
                });
            }
        }
        if state.status & !KNOWN_STATUS != 0 {
            return Err(invalid(format!(
                "status {:#x} has undefined bits {:#x}",
                state.status,
                state.status & !KNOWN_STATUS
            )));
        }
        if state.status & status::FEATURES_OK != 0 {
            let extra = state.driver_features & !self.offered_features;
            if extra != 0 {
                return Err(TransportError::RestoreFeatures {
                    driver: state.driver_features,
                    offered: self.offered_features,
                    extra,
                });
            }
            if state.driver_features & VIRTIO_F_VERSION_1 == 0 {
                return Err(invalid(format!(
                    "FEATURES_OK with driver features {:#x}, which lack VIRTIO_F_VERSION_1",
                    state.driver_features
                )));
            }
        }
        let interrupt_bits = INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE;
        if state.interrupt_status & !interrupt_bits != 0 {
            return Err(invalid(format!(
                "interrupt status {:#x} has undefined bits",
                state.interrupt_status
            )));
        }
        let needed = status::FEATURES_OK | status::DRIVER_OK;
        let active = state.queues.iter().filter(|q| q.active.is_some()).count();
        if state.activated && (state.status & needed != needed || active == 0) {
            return Err(invalid(format!(
                "activated, but status {:#x} lacks FEATURES_OK or DRIVER_OK, or no queue is active ({active})",
                state.status
            )));
        }
        let needs_reset = state.status & status::DEVICE_NEEDS_RESET != 0;
        if !state.activated && state.status & status::DRIVER_OK != 0 && !needs_reset {
            return Err(invalid(format!(
                "status {:#x} has DRIVER_OK, but the device was not activated",
                state.status
            )));
        }
        if !state.activated && active != 0 {
            return Err(invalid(format!(
                "not activated, but {active} queues have device state"
            )));
        }
        let mut queues = Vec::with_capacity(count);
        for (index, (q, &max)) in state.queues.iter().zip(&self.queue_max_sizes).enumerate() {
            if q.size != 0 && (q.size > max || !q.size.is_power_of_two()) {
                return Err(invalid(format!(
                    "queue {index}: size {} (maximum {max}, a power of two)",
                    q.size
                )));
            }
            let configured =
                q.size != 0 && q.desc.is_some() && q.avail.is_some() && q.used.is_some();
            if q.ready && !configured {
                return Err(invalid(format!(
                    "queue {index} is ready without a size and all three ring addresses"
                )));
            }
            if let Some(active) = &q.active {
                // The device's queue is the one the driver's registers describe, as an
                // activation makes it: ready, same size and rings, and EVENT_IDX as
                // negotiated. Anything else is a state `save_state` never writes.
                let event_idx = state.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
                let mismatch = if !q.ready || !active.ready {
                    Some("is active but not ready".to_string())
                } else if active.size != q.size {
                    Some(format!(
                        "has size {} in its registers, {} in the device",
                        q.size, active.size
                    ))
                } else if q.desc != Some(active.desc_table)
                    || q.avail != Some(active.avail_ring)
                    || q.used != Some(active.used_ring)
                {
                    Some("has other ring addresses in its registers than in the device".to_string())
                } else if active.event_idx_enabled != event_idx {
                    Some(format!(
                        "has EVENT_IDX {} in the device, but the driver features say {event_idx}",
                        active.event_idx_enabled
                    ))
                } else {
                    None
                };
                if let Some(why) = mismatch {
                    return Err(invalid(format!("queue {index} {why}")));
                }
            }
            queues.push(QueueConfig {
                size: q.size,
                ready: q.ready,
                desc: address_from_state(q.desc),
                driver: address_from_state(q.avail),
                device: address_from_state(q.used),
            });
        }
        Ok(Registers {
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            shm_sel: state.shm_sel,
            queues,
            activated: state.activated,
        })
    }

    /// Queue `index` rebuilt from `state`, validated as an activation validates a queue.
    fn rebuild_queue(&self, index: usize, state: &QueueState) -> Result<ActiveQueue, String> {
        let max = self
            .queue_max_sizes
            .get(index)
            .copied()
            .ok_or_else(|| format!("queue {index} does not exist"))?;
        if state.max_size != max {
            return Err(format!(
                "queue {index}: saved maximum size {} differs from the device's {max}",
                state.max_size
            ));
        }
        if state.size == 0 || state.size > max.min(MAX_QUEUE_SIZE) {
            return Err(format!(
                "queue {index}: size {} (maximum {max})",
                state.size
            ));
        }
        let mut queue = Queue::try_from(virtio_queue::QueueState::from(*state)).map_err(|e| {
            format!(
                "queue {index}: size {} or ring addresses (descriptors {:#x}, available {:#x}, used {:#x}): {e}",
                state.size, state.desc_table, state.avail_ring, state.used_ring
            )
        })?;
        queue.set_ready(true);
        if !super::rings_in_memory(&*self.mem.memory(), &queue) {
            return Err(format!(
                "queue {index}: rings (descriptors {:#x}, available {:#x}, used {:#x}, size {}) \
                 are not inside guest memory",
                state.desc_table, state.avail_ring, state.used_ring, state.size
            ));
        }
        let notify = self
            .notify
            .get(index)
            .ok_or_else(|| format!("queue {index} has no notify eventfd"))?
            .try_clone()
            .map_err(|e| format!("queue {index}: cloning the notify eventfd: {e}"))?;
        let index =
            u16::try_from(index).map_err(|_| format!("queue index {index} out of range"))?;
        Ok(ActiveQueue {
            index,
            queue,
            notify,
        })
    }

    /// Signals the notify eventfd of each queue in `indices`.
    fn kick(&self, indices: impl Iterator<Item = u16>) {
        for index in indices {
            if let Some(evt) = self.notify.get(usize::from(index)) {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio-mmio: cannot kick queue {index}: {e}");
                }
            }
        }
    }
}
