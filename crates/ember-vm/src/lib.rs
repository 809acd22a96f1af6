//! A KVM virtual machine for Ember VMMs (being assembled: slots and the irqchip so far).

#![deny(missing_docs)]

mod error;
pub mod irqchip;
pub mod slots;

pub use error::VmError;
pub use irqchip::create_irqchip_and_pit;
pub use slots::register_memory_slots;
/// The KVM crates this crate's API uses, so users get the matching versions.
pub use {kvm_bindings, kvm_ioctls};
