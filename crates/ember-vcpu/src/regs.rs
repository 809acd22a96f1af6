//! Registers, segments, GDT and page tables for entering a guest in 64-bit mode.
//!
//! The Linux 64-bit boot protocol (and Ember's own test guests) start with paging on,
//! an identity map of low memory, flat 64-bit segments, interrupts off and `RSI`
//! pointing at the zero page. The boot GDT and page tables live in low memory, in
//! the areas Linux's boot protocol leaves to the loader.

use crate::x86::{
    CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE, EFER_LMA,
    EFER_LME, PTE_HUGE, PTE_PRESENT, PTE_USER, PTE_WRITABLE,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::VcpuError;

/// Guest address of the boot GDT.
pub const BOOT_GDT_START: u64 = ember_arch::layout::BOOT_GDT_START;
/// Guest address of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = ember_arch::layout::BOOT_IDT_START;
/// Default initial stack pointer (grows down from just below the page tables).
pub const BOOT_STACK_POINTER: u64 = ember_arch::layout::BOOT_STACK_POINTER;
/// Guest address of the PML4 table.
pub const PML4_START: u64 = ember_arch::layout::PML4_START;
/// Guest address of the page-directory-pointer table.
pub const PDPTE_START: u64 = ember_arch::layout::PDPTE_START;
/// Guest address of the first of [`IDENTITY_MAP_GIB`] page directories.
pub const PDE_START: u64 = ember_arch::layout::PDE_START;
/// How much is identity-mapped at entry, in GiB (2 MiB pages): all of the 32-bit space,
/// so MMIO devices below 4 GiB are reachable too.
pub const IDENTITY_MAP_GIB: u64 = 4;

/// GDT selectors. The kernel code and data selectors are the ones Linux's 64-bit boot
/// protocol requires (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18), so a bzImage's 64-bit
/// entry finds them.
pub mod selector {
    /// 64-bit kernel code (GDT index 2).
    pub const KERNEL_CODE: u16 = 0x10;
    /// Flat kernel data, 32- and 64-bit (GDT index 3).
    pub const KERNEL_DATA: u16 = 0x18;
    /// User data, DPL 3 (GDT index 4), with RPL 3.
    pub const USER_DATA: u16 = 0x20 | 3;
    /// 64-bit user code, DPL 3 (GDT index 5), with RPL 3.
    pub const USER_CODE: u16 = 0x28 | 3;
    /// Flat 32-bit kernel code, for the PVH entry (GDT index 6).
    pub const KERNEL_CODE32: u16 = 0x30;
    /// Task state segment (GDT index 7).
    pub const TSS: u16 = 0x38;
}

// The boot tables are marked user-accessible so that test guests may drop to CPL3
// (where nested KVM runs code natively); kernels install their own tables at once.
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

/// Builds a GDT descriptor from flags (bits 15:12 = G, D/B, L, AVL; 7:0 = access byte),
/// base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT, indexed as [`selector`] says.
pub const BOOT_GDT: [u64; 8] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, DPL 0
    gdt_entry(0xc093, 0, 0xfffff), // data, DPL 0
    gdt_entry(0xc0f3, 0, 0xfffff), // data, DPL 3
    gdt_entry(0xa0fb, 0, 0xfffff), // 64-bit code, DPL 3
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, DPL 0
    gdt_entry(0x808b, 0, 0xfffff), // 32-bit busy TSS
];

// The IDT must not overlap the GDT.
const _: () = assert!(BOOT_GDT_START + 8 * BOOT_GDT.len() as u64 <= BOOT_IDT_START);

/// The GDT entry for a selector.
const fn gdt_index(selector: u16) -> usize {
    (selector >> 3) as usize
}

/// `kvm_segment` for one of the boot GDT's selectors.
fn boot_segment(selector: u16) -> kvm_segment {
    let index = gdt_index(selector);
    segment_from_gdt(BOOT_GDT[index], index as u8)
}

/// Turns a GDT descriptor into the `kvm_segment` KVM expects for it.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With G set the limit counts 4 KiB pages; KVM wants it in bytes.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (u16::from(table_index) * 8) | ((entry >> 45) & 3) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), VcpuError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| VcpuError::GuestMemory { what, addr, source })
}

/// Writes the boot GDT, an empty IDT and identity-mapping page tables for the first
/// [`IDENTITY_MAP_GIB`] GiB into guest memory. Call once per VM, before
/// [`setup_long_mode`] on each vCPU.
///
/// ```
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// ember_vcpu::regs::write_boot_tables(&mem).unwrap();
/// let pml4e: u64 = mem.read_obj(GuestAddress(ember_vcpu::regs::PML4_START)).unwrap();
/// assert_eq!(pml4e & !0xfff, ember_vcpu::regs::PDPTE_START);
/// ```
pub fn write_boot_tables<M: GuestMemory>(mem: &M) -> Result<(), VcpuError> {
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, "GDT", BOOT_GDT_START, &gdt)?;
    write(mem, "IDT", BOOT_IDT_START, &0u64.to_le_bytes())?;
    write(
        mem,
        "PML4",
        PML4_START,
        &(PDPTE_START | TABLE_FLAGS).to_le_bytes(),
    )?;
    let pdptes: Vec<u8> = (0..IDENTITY_MAP_GIB)
        .flat_map(|i| ((PDE_START + i * 0x1000) | TABLE_FLAGS).to_le_bytes())
        .collect();
    write(mem, "page-directory-pointer table", PDPTE_START, &pdptes)?;
    let pdes: Vec<u8> = (0..IDENTITY_MAP_GIB * 512)
        .flat_map(|i| ((i << 21) | TABLE_FLAGS | PTE_HUGE).to_le_bytes())
        .collect();
    write(mem, "page directories", PDE_START, &pdes)
}

/// Loads the boot GDT and IDT, `code` into CS, kernel data everywhere else, and the TSS.
fn set_segments(sregs: &mut kvm_sregs, code: u16) {
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = boot_segment(selector::KERNEL_DATA);
    sregs.cs = boot_segment(code);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = boot_segment(selector::TSS);
}

/// Puts `sregs` in 64-bit mode with the boot GDT, IDT and page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    set_segments(sregs, selector::KERNEL_CODE);

    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 |= CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Where and how a vCPU starts in 64-bit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootRegs {
    /// Entry point (`RIP`).
    pub entry: GuestAddress,
    /// Initial stack pointer (`RSP`, and `RBP`).
    pub stack: GuestAddress,
    /// Value of `RSI`: the zero page for the Linux boot protocol.
    pub rsi: u64,
    /// Value of `RDI`: Ember's test guests receive the vCPU index here.
    pub rdi: u64,
}

/// Sets special registers for 64-bit mode and general registers from `boot`.
/// [`write_boot_tables`] must have been called on the VM's memory.
pub fn setup_long_mode(vcpu: &VcpuFd, boot: &BootRegs) -> Result<(), VcpuError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| VcpuError::kvm("KVM_GET_SREGS", e))?;
    long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)
        .map_err(|e| VcpuError::kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set; IF clear
        rip: boot.entry.0,
        rsp: boot.stack.0,
        rbp: boot.stack.0,
        rsi: boot.rsi,
        rdi: boot.rdi,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| VcpuError::kvm("KVM_SET_REGS", e))
}

/// Puts `sregs` in 32-bit protected mode with paging off and flat segments: the state
/// the PVH boot ABI specifies (the 32-bit code segment is the boot GDT's
/// [`selector::KERNEL_CODE32`]).
pub fn protected_mode_sregs(sregs: &mut kvm_sregs) {
    set_segments(sregs, selector::KERNEL_CODE32);
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & !CR0_PG;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// Enters a kernel through its PVH entry point: 32-bit protected mode, paging off,
/// `EBX` = the `hvm_start_info` address, interrupts off. [`write_boot_tables`] must
/// have been called on the VM's memory (for the GDT).
pub fn setup_pvh_entry(
    vcpu: &VcpuFd,
    entry: GuestAddress,
    start_info: GuestAddress,
) -> Result<(), VcpuError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| VcpuError::kvm("KVM_GET_SREGS", e))?;
    protected_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)
        .map_err(|e| VcpuError::kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rbx: start_info.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| VcpuError::kvm("KVM_SET_REGS", e))
}

/// Sets the x87 and SSE control words to their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| VcpuError::kvm("KVM_SET_FPU", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_segments_decode() {
        // Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
        let code = boot_segment(selector::KERNEL_CODE);
        assert_eq!(
            (code.selector, code.l, code.db, code.dpl, code.type_),
            (0x10, 1, 0, 0, 0xb)
        );
        assert_eq!(
            (code.limit, code.g, code.present, code.s),
            (0xffff_ffff, 1, 1, 1)
        );
        let data = boot_segment(selector::KERNEL_DATA);
        assert_eq!(
            (data.selector, data.l, data.db, data.type_),
            (0x18, 0, 1, 3)
        );
        let code32 = boot_segment(selector::KERNEL_CODE32);
        assert_eq!(
            (code32.selector, code32.l, code32.db, code32.type_),
            (0x30, 0, 1, 0xb)
        );
        let tss = boot_segment(selector::TSS);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x38, 0, 0xb));
        let ucode = boot_segment(selector::USER_CODE);
        assert_eq!(
            (ucode.selector, ucode.dpl, ucode.l),
            (selector::USER_CODE, 3, 1)
        );
        let udata = boot_segment(selector::USER_DATA);
        assert_eq!((udata.selector, udata.dpl), (selector::USER_DATA, 3));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        // Walk the tables for a few addresses, as the MMU would.
        for addr in [0u64, 0x20_0000, 0x1234_5678, 0xfee0_0000, 0xffff_ffff] {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(PML4_START + 8 * (addr >> 39)))
                .unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + 8 * ((addr >> 30) & 511)))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((addr >> 21) & 511)))
                .unwrap();
            assert_eq!(pde & 0x87, 0x87, "{addr:#x}");
            assert_eq!((pde & !0x1f_ffff & !0xfff) | (addr & 0x1f_ffff), addr);
        }
        let gdt: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 0x10)).unwrap();
        assert_eq!(gdt, BOOT_GDT[2]);
    }

    #[test]
    fn boot_tables_need_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            write_boot_tables(&mem),
            Err(VcpuError::GuestMemory {
                what: "PML4",
                addr: PML4_START,
                ..
            })
        ));
    }

    #[test]
    fn long_mode_bits() {
        let mut sregs = kvm_sregs::default();
        long_mode_sregs(&mut sregs);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cs.selector, selector::KERNEL_CODE);
    }

    #[test]
    fn protected_mode_bits() {
        let mut sregs = kvm_sregs::default();
        long_mode_sregs(&mut sregs);
        protected_mode_sregs(&mut sregs);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((sregs.efer, sregs.cr4), (0, 0));
        assert_eq!(
            (sregs.cs.selector, sregs.cs.db, sregs.cs.l),
            (selector::KERNEL_CODE32, 1, 0)
        );
        assert_eq!(sregs.ss.selector, selector::KERNEL_DATA);
    }
}
