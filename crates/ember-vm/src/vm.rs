//! [`Vm`]: a KVM VM that owns its file descriptor and its guest memory.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use ember_arch::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::slots;
use crate::VmError;

/// A KVM virtual machine: the VM file descriptor and the guest memory registered with
/// it, generic over the guest memory's dirty-page bitmap `B` (`()` for none,
/// `vm_memory::bitmap::AtomicBitmap` to track the pages the VMM writes).
///
/// [`Vm::new`] creates the VM, gives KVM the addresses it needs for real mode on Intel
/// hosts (the TSS and identity-map pages in the 32-bit MMIO hole,
/// [`ember_arch::layout::KVM_TSS_START`] and
/// [`ember_arch::layout::KVM_IDENTITY_MAP_START`]) and registers every region of the
/// guest memory as a KVM memory slot: region `i`, in address order, is slot `i`.
///
/// # Lifetime
///
/// A `Vm` is a handle: cloning it is cheap and gives another handle to the same VM, as
/// `Arc` does. vCPUs hold one (`ember_vcpu::Vcpu` does), because the kernel keeps a VM
/// alive for as long as any of its vCPU file descriptors is open, and guest RAM must stay
/// mapped for as long as KVM can reach it. When the last handle is dropped, the memory
/// slots are deleted, the VM file descriptor is closed and the guest memory is unmapped
/// (unless something else, a virtio device say, still holds a clone of the memory).
///
/// ```no_run
/// use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
/// use ember_vm::Vm;
/// use vm_memory::{Bytes, GuestAddress};
///
/// let kvm = kvm_ioctls::Kvm::new()?;
/// let layout = MemoryLayout::new(64 * MIB)?;
/// let vm = Vm::new(&kvm, create_guest_memory(&layout, HugePages::None)?)?;
/// vm.create_irqchip_and_pit()?; // before any vCPU
/// vm.memory().write_obj(0xf4u8, GuestAddress(0x10_0000))?; // hlt
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Vm<B = ()> {
    inner: Arc<Inner<B>>,
}

/// What every handle of a VM shares.
struct Inner<B> {
    /// Declared before `memory`: fields drop in order, so the VM file descriptor is
    /// closed before the memory is released.
    fd: VmFd,
    /// The regions registered with KVM, in slot order, with their current flags (all
    /// slots have the same), for the dirty log and for deleting them. Locked while the
    /// flags change or the dirty log is read.
    slots: Mutex<Vec<kvm_userspace_memory_region>>,
    /// `KVM_GET_VCPU_MMAP_SIZE`: how much of a vCPU fd to map for its `kvm_run`.
    vcpu_mmap_size: usize,
    memory: GuestMemoryMmap<B>,
}

impl<B> Clone for Vm<B> {
    fn clone(&self) -> Self {
        Vm {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B> fmt::Debug for Vm<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("fd", &self.inner.fd)
            .field("slots", &self.inner.lock_slots().len())
            .finish_non_exhaustive()
    }
}

impl<B: Bitmap> Vm<B> {
    /// Creates a VM on `kvm`, sets the TSS and identity-map addresses, and registers
    /// every region of `memory` as a memory slot, numbered from 0 in address order.
    ///
    /// Fails if KVM refuses any of it, if `memory` has more regions than KVM has slots,
    /// or if a region does not own its host mapping (one made with
    /// `MmapRegion::build_raw`): nothing would then guarantee the mapping outlives the
    /// VM.
    ///
    /// ```no_run
    /// use ember_memory::{create_guest_memory, HugePages, MemoryLayout, GIB};
    ///
    /// let kvm = kvm_ioctls::Kvm::new()?;
    /// // 4 GiB of RAM is split around the MMIO hole: two regions, two slots.
    /// let layout = MemoryLayout::new(4 * GIB)?;
    /// let vm = ember_vm::Vm::new(&kvm, create_guest_memory(&layout, HugePages::None)?)?;
    /// assert_eq!(vm.memory_slots(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap<B>) -> Result<Self, VmError> {
        Self::create(kvm, memory, 0)
    }

    /// As [`Vm::new`], with KVM's dirty log on from the start: every slot is registered
    /// with `KVM_MEM_LOG_DIRTY_PAGES`, as [`Vm::set_dirty_log`]`(true)` would re-register
    /// it. For a VM whose snapshots may be diffs.
    ///
    /// ```no_run
    /// use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
    ///
    /// let kvm = kvm_ioctls::Kvm::new()?;
    /// let layout = MemoryLayout::new(64 * MIB)?;
    /// let mem = create_guest_memory(&layout, HugePages::None)?;
    /// let vm = ember_vm::Vm::new_with_dirty_log(&kvm, mem)?;
    /// assert!(vm.dirty_log_enabled());
    /// assert!(vm.dirty_log()?[0].iter().all(|&word| word == 0));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new_with_dirty_log(kvm: &Kvm, memory: GuestMemoryMmap<B>) -> Result<Self, VmError> {
        Self::create(kvm, memory, KVM_MEM_LOG_DIRTY_PAGES)
    }

    /// [`Vm::new`], with `flags` for every slot.
    fn create(kvm: &Kvm, memory: GuestMemoryMmap<B>, flags: u32) -> Result<Self, VmError> {
        let vcpu_mmap_size = kvm.get_vcpu_mmap_size().map_err(VmError::VcpuMmapSize)?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        // Both only matter on Intel hosts, for real-mode code; KVM wants them before vCPUs.
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|source| VmError::SetIdentityMapAddress {
                addr: KVM_IDENTITY_MAP_START,
                source,
            })?;
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(|source| VmError::SetTssAddress {
                addr: KVM_TSS_START,
                source,
            })?;
        // `inner` owns the memory before any slot exists, and its `Drop` deletes the
        // slots registered so far if registration fails half-way.
        let mut inner = Inner {
            fd,
            slots: Mutex::new(Vec::new()),
            vcpu_mmap_size,
            memory,
        };
        let registered = inner.slots.get_mut().unwrap_or_else(|e| e.into_inner());
        slots::register(&inner.fd, &inner.memory, flags, registered)?;
        Ok(Vm {
            inner: Arc::new(inner),
        })
    }
}

impl<B> Vm<B> {
    /// The VM file descriptor, for the VM-level KVM calls this type does not wrap
    /// (GSI routing, MSR filters, `KVM_ENABLE_CAP`, ...).
    ///
    /// vCPUs created directly with `VmFd::create_vcpu` do not hold this `Vm`: once its
    /// last handle is dropped, their guest sees no RAM (its slots are deleted), so
    /// create vCPUs through `ember_vcpu::Vcpu::new`, which holds one.
    pub fn fd(&self) -> &VmFd {
        &self.inner.fd
    }

    /// The guest memory: every region of it is registered with KVM.
    pub fn memory(&self) -> &GuestMemoryMmap<B> {
        &self.inner.memory
    }

    /// The size of a vCPU's shared `kvm_run` area (`KVM_GET_VCPU_MMAP_SIZE`): `kvm_run`,
    /// then the port-I/O data page and the coalesced-MMIO ring, for a VMM that maps a
    /// vCPU fd itself (`ember_vcpu` does, so that port-I/O data at `kvm_run`'s
    /// `data_offset` is read through a pointer to the whole mapping).
    pub fn vcpu_mmap_size(&self) -> usize {
        self.inner.vcpu_mmap_size
    }

    /// How many memory slots the guest memory took (slots `0..n`, one per region).
    pub fn memory_slots(&self) -> usize {
        self.inner.lock_slots().len()
    }

    /// Turns KVM's dirty log on or off: re-registers every memory slot with
    /// `KVM_MEM_LOG_DIRTY_PAGES` set or cleared (only the flag changes; the guest keeps
    /// running on the same memory). Turning it on starts with a clean log; turning it
    /// off drops what was logged. If KVM refuses a slot, the slots changed before it are
    /// put back, so [`Vm::dirty_log_enabled`] stays true for all slots or none.
    ///
    /// KVM logs the pages the guest (and KVM itself, for example the kvmclock page)
    /// writes, not those the VMM writes through the memory's mapping: track those with
    /// vm-memory's `AtomicBitmap` (`ember_memory::DirtyBitmap` merges both).
    ///
    /// ```no_run
    /// # let kvm = kvm_ioctls::Kvm::new()?;
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])?;
    /// let vm = ember_vm::Vm::new(&kvm, mem)?;
    /// vm.set_dirty_log(true)?;
    /// // ... run the guest, then, with it paused:
    /// let dirty = vm.dirty_log()?; // one bitmap per slot
    /// vm.set_dirty_log(false)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_dirty_log(&self, on: bool) -> Result<(), VmError> {
        let mut registered = self.inner.lock_slots();
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        if registered.iter().all(|slot| slot.flags == flags) {
            return Ok(());
        }
        slots::set_flags(&self.inner.fd, &mut registered, flags)?;
        log::debug!(
            "dirty log {} for {} memory slot(s)",
            if on { "on" } else { "off" },
            registered.len()
        );
        Ok(())
    }

    /// Whether KVM's dirty log is on ([`Vm::set_dirty_log`], [`Vm::new_with_dirty_log`]).
    ///
    /// ```no_run
    /// # let kvm = kvm_ioctls::Kvm::new()?;
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])?;
    /// let vm = ember_vm::Vm::new(&kvm, mem)?;
    /// assert!(!vm.dirty_log_enabled());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dirty_log_enabled(&self) -> bool {
        let registered = self.inner.lock_slots();
        !registered.is_empty()
            && registered
                .iter()
                .all(|slot| slot.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
    }

    /// Reads and clears KVM's dirty log (`KVM_GET_DIRTY_LOG`) of every memory slot, in
    /// slot order, which is the guest memory's region order: bit `p % 64` of word
    /// `p / 64` of entry `i` is page `p` (4 KiB) of region `i`, set if the guest wrote
    /// it since the previous call (or since the log was turned on).
    ///
    /// Fails with [`VmError::DirtyLogDisabled`] unless the log is on. For a consistent
    /// snapshot, read it with every vCPU paused.
    ///
    /// ```no_run
    /// use ember_memory::{DirtyBitmap, create_guest_memory, HugePages, MemoryLayout, MIB};
    ///
    /// let kvm = kvm_ioctls::Kvm::new()?;
    /// let mem = create_guest_memory(&MemoryLayout::new(64 * MIB)?, HugePages::None)?;
    /// let vm = ember_vm::Vm::new_with_dirty_log(&kvm, mem)?;
    /// // ... run the guest, pause it ...
    /// let mut dirty = DirtyBitmap::new(vm.memory());
    /// for (region, words) in vm.dirty_log()?.iter().enumerate() {
    ///     dirty.or_region_words(region, words)?;
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dirty_log(&self) -> Result<Vec<Vec<u64>>, VmError> {
        let registered = self.inner.lock_slots();
        if registered.is_empty()
            || registered
                .iter()
                .any(|slot| slot.flags & KVM_MEM_LOG_DIRTY_PAGES == 0)
        {
            return Err(VmError::DirtyLogDisabled);
        }
        registered
            .iter()
            .map(|slot| {
                // vm-memory only builds for 64-bit targets, so u64 -> usize is lossless.
                self.inner
                    .fd
                    .get_dirty_log(slot.slot, slot.memory_size as usize)
                    .map_err(|source| VmError::GetDirtyLog {
                        slot: slot.slot,
                        source,
                    })
            })
            .collect()
    }

    /// Routes writes to `fd` to the guest as an edge on `gsi` (`KVM_IRQFD`): how
    /// devices on other threads interrupt the guest without a KVM call of their own.
    /// Needs the in-kernel irqchip ([`Vm::create_irqchip_and_pit`]).
    ///
    /// ```no_run
    /// # let kvm = kvm_ioctls::Kvm::new()?;
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])?;
    /// # let vm = ember_vm::Vm::new(&kvm, mem)?;
    /// vm.create_irqchip_and_pit()?;
    /// let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
    /// vm.register_irqfd(&irq, ember_arch::layout::COM1_GSI)?;
    /// irq.write(1)?; // raises IRQ 4 in the guest
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.inner
            .fd
            .register_irqfd(fd, gsi)
            .map_err(|source| VmError::Irqfd {
                gsi,
                assign: true,
                source,
            })
    }

    /// Undoes [`Vm::register_irqfd`] for `fd` and `gsi`.
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.inner
            .fd
            .unregister_irqfd(fd, gsi)
            .map_err(|source| VmError::Irqfd {
                gsi,
                assign: false,
                source,
            })
    }

    /// Makes guest writes to `addr` signal `fd` inside KVM (`KVM_IOEVENTFD`) instead of
    /// exiting to the VMM: how a virtio queue notification reaches its device's worker
    /// without a vCPU exit. With `datamatch` a `u8`, `u16`, `u32` or `u64`, only writes
    /// of that width and value signal `fd`; with [`kvm_ioctls::NoDatamatch`], every
    /// write does.
    ///
    /// ```no_run
    /// use kvm_ioctls::IoEventAddress;
    /// # let kvm = kvm_ioctls::Kvm::new()?;
    /// # let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])?;
    /// # let vm = ember_vm::Vm::new(&kvm, mem)?;
    /// let notify = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
    /// // A 32-bit write of 0 (queue 0) to the virtio-mmio QueueNotify register.
    /// vm.register_ioeventfd(&notify, IoEventAddress::Mmio(0xd000_0050), 0u32)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register_ioeventfd<T: Into<u64> + Copy>(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: T,
    ) -> Result<(), VmError> {
        self.inner
            .fd
            .register_ioevent(fd, &addr, datamatch)
            .map_err(|source| VmError::Ioeventfd {
                addr,
                datamatch: datamatch_value(datamatch),
                assign: true,
                source,
            })
    }

    /// Undoes [`Vm::register_ioeventfd`] with the same arguments.
    pub fn unregister_ioeventfd<T: Into<u64> + Copy>(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: T,
    ) -> Result<(), VmError> {
        self.inner
            .fd
            .unregister_ioevent(fd, &addr, datamatch)
            .map_err(|source| VmError::Ioeventfd {
                addr,
                datamatch: datamatch_value(datamatch),
                assign: false,
                source,
            })
    }
}

/// The value an ioeventfd matches, for error messages: none for `NoDatamatch`, whose
/// size (zero) is how KVM is told not to match.
fn datamatch_value<T: Into<u64>>(datamatch: T) -> Option<u64> {
    (std::mem::size_of::<T>() > 0).then(|| datamatch.into())
}

impl<B> Inner<B> {
    /// The slot list, locked (a panic while it was held changed no slot half-way: the
    /// list is only updated after KVM accepted each change).
    fn lock_slots(&self) -> MutexGuard<'_, Vec<kvm_userspace_memory_region>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<B> Drop for Inner<B> {
    fn drop(&mut self) {
        // The last handle is gone, and every `ember_vcpu::Vcpu` holds one, so none of
        // their vCPU file descriptors is open. A vCPU made directly on `fd` (or another
        // fd that keeps the kernel VM alive) may still be, so the slots go first: once
        // KVM has deleted them it no longer reaches the mapping, and unmapping it (when
        // `memory` drops after this) cannot let a guest read or write whatever the
        // process maps at those addresses next.
        let registered = self.slots.get_mut().unwrap_or_else(|e| e.into_inner());
        if !slots::delete(&self.fd, registered) {
            // KVM may still reach the memory: keep it mapped for the rest of the process.
            log::error!("cannot delete the VM's memory slots: leaking its guest memory");
            std::mem::forget(std::mem::take(&mut self.memory));
        }
    }
}
