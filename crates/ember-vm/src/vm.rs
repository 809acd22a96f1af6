//! [`Vm`]: a KVM VM that owns its file descriptor and its guest memory.

use std::fmt;
use std::sync::Arc;

use ember_arch::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use kvm_bindings::kvm_userspace_memory_region;
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
    /// The regions registered with KVM, in slot order, for deleting them.
    slots: Vec<kvm_userspace_memory_region>,
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
            .field("slots", &self.inner.slots.len())
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
            slots: Vec::new(),
            vcpu_mmap_size,
            memory,
        };
        slots::register(&inner.fd, &inner.memory, &mut inner.slots)?;
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
        self.inner.slots.len()
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

impl<B> Drop for Inner<B> {
    fn drop(&mut self) {
        // The last handle is gone, and every `ember_vcpu::Vcpu` holds one, so none of
        // their vCPU file descriptors is open. A vCPU made directly on `fd` (or another
        // fd that keeps the kernel VM alive) may still be, so the slots go first: once
        // KVM has deleted them it no longer reaches the mapping, and unmapping it (when
        // `memory` drops after this) cannot let a guest read or write whatever the
        // process maps at those addresses next.
        if !slots::delete(&self.fd, &self.slots) {
            // KVM may still reach the memory: keep it mapped for the rest of the process.
            log::error!("cannot delete the VM's memory slots: leaking its guest memory");
            std::mem::forget(std::mem::take(&mut self.memory));
        }
    }
}
