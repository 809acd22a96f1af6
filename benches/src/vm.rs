//! One VM set-up for both run loops, so that they differ only in how exits are handled.
//!
//! A VM with 64 MiB of RAM (ember-memory), Ember's boot GDT, the guest's PVH ELF image
//! loaded by Ember's loader (`ember_boot::load_elf`), no in-kernel irqchip (so `hlt`
//! reaches userspace), and one vCPU entered at the image's PVH entry point in 32-bit
//! protected mode at CPL0 ([`regs::setup_pvh_entry`], as `ember` enters a PVH kernel),
//! with Ember's CPUID, boot MSRs and FPU state. The vCPU
//! comes either raw ([`BenchVm::raw_vcpu`], for the floor) or wrapped in an
//! [`ember_vcpu::Vcpu`] ([`BenchVm::ember_vcpu`]); both are configured by the same code
//! through the vCPU file descriptor.

use std::sync::Arc;

use ember_bus::Bus;
use ember_memory::vm_memory::GuestAddress;
use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
use ember_vcpu::{cpuid, msrs, regs, Vcpu};
use ember_vm::Vm;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::Error;

/// Guest RAM size.
pub const RAM_SIZE: u64 = 64 * MIB;

/// A VM ready for its one vCPU.
#[derive(Debug)]
pub struct BenchVm {
    vm: Vm,
    supported_cpuid: CpuId,
    entry: GuestAddress,
}

impl BenchVm {
    /// Creates the VM and loads `image`, an ELF with a PVH note (see
    /// [`crate::guest::pvh_elf`]).
    pub fn new(image: &[u8]) -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(|source| Error::Kvm {
            op: "open /dev/kvm",
            source,
        })?;
        let layout = MemoryLayout::new(RAM_SIZE)?;
        let vm = Vm::new(&kvm, create_guest_memory(&layout, HugePages::None)?)?;
        let mem = vm.memory().clone();
        regs::write_boot_tables(&mem)?;
        let load =
            ember_boot::load_elf(&mem, image, GuestAddress(ember_arch::layout::HIMEM_START))?;
        let entry = load.pvh_entry.ok_or(Error::NoPvhEntry)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| Error::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        Ok(BenchVm {
            vm,
            supported_cpuid,
            entry,
        })
    }

    /// Creates vCPU 0 as a bare `VcpuFd`, configured like [`BenchVm::ember_vcpu`]. It
    /// does not hold the VM: keep this `BenchVm` while it runs.
    pub fn raw_vcpu(&self) -> Result<VcpuFd, Error> {
        let fd = self.vm.fd().create_vcpu(0).map_err(|source| Error::Kvm {
            op: "KVM_CREATE_VCPU",
            source,
        })?;
        self.configure(&fd)?;
        Ok(fd)
    }

    /// Creates vCPU 0 as an Ember [`Vcpu`] whose exits go to `pio` and `mmio`.
    pub fn ember_vcpu(&self, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Vcpu, Error> {
        let vcpu = Vcpu::new(&self.vm, 0, pio, mmio)?;
        self.configure(vcpu.fd())?;
        Ok(vcpu)
    }

    /// CPUID, boot MSRs, FPU and the PVH entry: what `Vcpu`'s own `set_cpuid(.., 1)`,
    /// `set_boot_msrs`, `set_fpu` and `set_pvh_entry` do (the guest reads no start
    /// info, so `EBX` is 0).
    fn configure(&self, fd: &VcpuFd) -> Result<(), Error> {
        fd.set_cpuid2(&cpuid::vcpu_cpuid(&self.supported_cpuid, 0, 1))
            .map_err(|source| Error::Kvm {
                op: "KVM_SET_CPUID2",
                source,
            })?;
        let msrs = msrs::boot_msrs()?;
        let set = fd.set_msrs(&msrs).map_err(|source| Error::Kvm {
            op: "KVM_SET_MSRS",
            source,
        })?;
        let total = msrs.as_slice().len();
        if set != total {
            return Err(Error::MsrsRejected { set, total });
        }
        regs::setup_fpu(fd)?;
        regs::setup_pvh_entry(fd, self.entry, GuestAddress(0))?;
        Ok(())
    }
}
