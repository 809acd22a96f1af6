//! The ACPI RSDP address both boot protocols pass to the kernel.

use vm_memory::{GuestAddress, GuestMemory};

use crate::guest::{check_range, GuestWriteError};

/// Size of a revision 2 RSDP, the most a kernel reads at the address it is given.
pub(crate) const RSDP_SIZE: u64 = 36;

/// The RSDP address to hand to the kernel (0: none, so the kernel scans the BIOS area
/// for one), after checking that an RSDP there lies in guest memory.
pub(crate) fn rsdp_paddr<M: GuestMemory>(
    mem: &M,
    rsdp: Option<GuestAddress>,
) -> Result<u64, GuestWriteError> {
    match rsdp {
        None => Ok(0),
        Some(GuestAddress(addr)) => {
            check_range(mem, "ACPI RSDP", addr, RSDP_SIZE)?;
            Ok(addr)
        }
    }
}
