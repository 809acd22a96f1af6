//! A KVM virtual machine for Ember VMMs: [`Vm`] owns the VM file descriptor and its guest
//! memory, registers the memory with KVM, and holds the VM-level KVM calls in one place
//! (irqchip and PIT, the TSS and identity-map addresses, irqfds, ioeventfds, and how
//! many vCPUs a VM may have). Dropping the last handle frees it all.
//!
//! For snapshots it saves and restores the VM-level state ([`VmState`]: PICs, IOAPIC,
//! PIT, kvmclock) and turns KVM's dirty log on and reads it ([`Vm::set_dirty_log`],
//! [`Vm::dirty_log`]) for diff snapshots.
//!
//! It is the counterpart of vmm-reference's `vm-vcpu` `KvmVm`, without the vCPUs:
//! `ember-vcpu` creates those from a [`Vm`], and each vCPU keeps the VM (and so its
//! memory) alive for as long as the vCPU exists.
//!
//! ```no_run
//! use ember_memory::{create_guest_memory, HugePages, MemoryLayout, MIB};
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! ember_vm::check_vcpu_count(&kvm, 2)?;
//! let layout = MemoryLayout::new(256 * MIB)?;
//! let vm = ember_vm::Vm::new(&kvm, create_guest_memory(&layout, HugePages::None)?)?;
//! vm.create_irqchip_and_pit()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod error;
mod irqchip;
mod slots;
mod state;
mod vcpus;
mod vm;

pub use error::VmError;
pub use state::VmState;
pub use vcpus::{check_vcpu_count, max_vcpus, MAX_VCPUS};
pub use vm::Vm;
/// The rust-vmm crates this crate's API uses, so users get the matching versions.
pub use {kvm_bindings, kvm_ioctls, vm_memory, vmm_sys_util};

/// The README's example, compiled as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
