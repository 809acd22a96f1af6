//! Local APIC set-up: LINT0 delivers ExtINT (the legacy PIC) and LINT1 delivers NMI,
//! as firmware would program them before handing over to a kernel.

use kvm_ioctls::VcpuFd;

use crate::VcpuError;

/// Offset of the LVT LINT0 register in the APIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode: ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

/// Replaces the delivery-mode field (bits 10:8) of an LVT register value.
///
/// ```
/// assert_eq!(ember_vcpu::lapic::set_delivery_mode(0x0001_0000, 0x7), 0x0001_0700);
/// ```
pub fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | ((mode & 0x7) << 8)
}

fn get_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = b as std::os::raw::c_char;
    }
}

/// Programs LINT0 as ExtINT and LINT1 as NMI. Needs the in-kernel irqchip.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| VcpuError::kvm("KVM_GET_LAPIC", e))?;
    let lvt0 = get_reg(&lapic.regs, APIC_LVT0);
    set_reg(
        &mut lapic.regs,
        APIC_LVT0,
        set_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_reg(&lapic.regs, APIC_LVT1);
    set_reg(
        &mut lapic.regs,
        APIC_LVT1,
        set_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic)
        .map_err(|e| VcpuError::kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_round_trip() {
        let mut regs = [0; 1024];
        set_reg(&mut regs, APIC_LVT1, 0xdead_beef);
        assert_eq!(get_reg(&regs, APIC_LVT1), 0xdead_beef);
        assert_eq!(get_reg(&regs, APIC_LVT0), 0);
        assert_eq!(set_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
    }
}
