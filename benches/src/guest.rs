//! The benchmark guests: 32-bit protected-mode code in an ELF image with a PVH note,
//! so that the very same image boots on QEMU's `-M microvm -kernel`, on the `ember`
//! binary (`--kernel`, PVH entry) and in the in-process run loops here.
//!
//! * [`Workload::image`]: `N` port writes (or MMIO writes) in a loop, then a write of 0
//!   to the debug-exit port ([`DEBUG_EXIT_PORT`]: ends `ember` with status 0 and QEMU
//!   with status 1 through `isa-debug-exit`), then `hlt` (ends the in-process loops).
//! * [`startup_image`]: the boot-done magic to [`BOOT_DONE_PORT`] first, then the same
//!   ending. On QEMU the boot-done port lies inside `isa-debug-exit,iobase=0xf4,
//!   iosize=4`, so QEMU ends at the guest's first I/O exit.
//!
//! They run at CPL0, which nested KVM hosts emulate instruction by instruction, so the
//! loop is as short as it can be: the access, `dec ecx`, `jnz`.

use ember_guests::GuestError;
use iced_x86::code_asm::*;

use crate::device::{MMIO_BASE, PIO_BASE};

/// Guest physical address the code is loaded at and entered (the PVH entry point).
pub const CODE_ADDR: u64 = 0x10_0000;
/// Ember's debug-exit port (`ember_devices::DEBUG_EXIT_PORT`), where QEMU's
/// `isa-debug-exit` is put too.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ember's boot-done port (`ember_devices::BOOT_DONE_PORT`).
pub const BOOT_DONE_PORT: u16 = 0xf5;
/// The boot-done magic (`ember_devices::BOOT_DONE_MAGIC`).
pub const BOOT_DONE_MAGIC: u8 = 123;

/// What the guest does in its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `out dx, al` to [`Workload::address`]: a 1-byte PIO write exit.
    Pio,
    /// `mov [ebx], eax` to [`Workload::address`]: a 4-byte MMIO write exit.
    Mmio,
}

impl Workload {
    /// Both workloads, in the order they are reported.
    pub const ALL: [Workload; 2] = [Workload::Pio, Workload::Mmio];

    /// A short name for tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Pio => "PIO write (out dx, al)",
            Workload::Mmio => "MMIO write (mov [ebx], eax)",
        }
    }

    /// A one-word name for file names.
    pub fn tag(self) -> &'static str {
        match self {
            Workload::Pio => "pio",
            Workload::Mmio => "mmio",
        }
    }

    /// The port or guest physical address the guest writes to. Nothing claims it on
    /// QEMU or in `ember`; the in-process Ember run puts a device there.
    pub fn address(self) -> u64 {
        match self {
            Workload::Pio => PIO_BASE,
            Workload::Mmio => MMIO_BASE,
        }
    }

    /// Assembles the 32-bit code for `iterations` writes (0 means none), to be loaded
    /// and entered at [`CODE_ADDR`].
    pub fn code(self, iterations: u32) -> Result<Vec<u8>, GuestError> {
        let addr = self.address() as u32;
        assemble32(|a| {
            let mut top = a.create_label();
            let mut done = a.create_label();
            a.mov(ecx, iterations)?;
            a.mov(eax, 0x2au32)?;
            match self {
                Workload::Pio => a.mov(edx, addr)?,
                Workload::Mmio => a.mov(ebx, addr)?,
            }
            a.test(ecx, ecx)?;
            a.jz(done)?;
            a.set_label(&mut top)?;
            match self {
                Workload::Pio => a.out(dx, al)?,
                Workload::Mmio => a.mov(dword_ptr(ebx), eax)?,
            }
            a.dec(ecx)?;
            a.jnz(top)?;
            a.set_label(&mut done)?;
            exit(a)
        })
    }

    /// The PVH ELF image of [`Workload::code`].
    pub fn image(self, iterations: u32) -> Result<Vec<u8>, GuestError> {
        Ok(pvh_elf(CODE_ADDR, &self.code(iterations)?))
    }
}

/// `out DEBUG_EXIT_PORT, 0; hlt`.
fn exit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.xor(eax, eax)?;
    a.out(u32::from(DEBUG_EXIT_PORT), al)?;
    a.hlt()
}

fn assemble32(
    build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<Vec<u8>, GuestError> {
    let mut a = CodeAssembler::new(32)?;
    build(&mut a)?;
    Ok(a.assemble(CODE_ADDR)?)
}

/// The start-up guest's code: boot-done first, then the debug-exit write and `hlt`.
pub fn startup_code() -> Result<Vec<u8>, GuestError> {
    assemble32(|a| {
        a.mov(al, u32::from(BOOT_DONE_MAGIC))?;
        a.out(u32::from(BOOT_DONE_PORT), al)?;
        exit(a)
    })
}

/// The PVH ELF image of [`startup_code`].
pub fn startup_image() -> Result<Vec<u8>, GuestError> {
    Ok(pvh_elf(CODE_ADDR, &startup_code()?))
}

/// Wraps 32-bit `code` in an x86-64 `ET_EXEC` ELF, like a `vmlinux`, with a PVH entry
/// note: [`ember_guests::elf::pvh_elf`] with no bss. `e_entry` and the PVH entry are both
/// `load_addr`.
///
/// ```
/// let image = ember_benches::guest::pvh_elf(0x10_0000, &[0xf4]);
/// assert_eq!(&image[..4], b"\x7fELF");
/// assert_eq!(image[0x1000], 0xf4);
/// ```
pub fn pvh_elf(load_addr: u64, code: &[u8]) -> Vec<u8> {
    ember_guests::elf::pvh_elf(load_addr, code, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn mnemonics(code: &[u8]) -> Vec<Mnemonic> {
        Decoder::with_ip(32, code, CODE_ADDR, DecoderOptions::NONE)
            .into_iter()
            .map(|i| i.mnemonic())
            .collect()
    }

    #[test]
    fn loops_are_access_dec_jnz_then_debug_exit_and_hlt() {
        use Mnemonic::*;
        let pio = Workload::Pio.code(5).unwrap();
        assert_eq!(
            mnemonics(&pio),
            [Mov, Mov, Mov, Test, Je, Out, Dec, Jne, Xor, Out, Hlt]
        );
        let mmio = Workload::Mmio.code(5).unwrap();
        assert_eq!(
            mnemonics(&mmio),
            [Mov, Mov, Mov, Test, Je, Mov, Dec, Jne, Xor, Out, Hlt]
        );
        assert_eq!(
            mnemonics(&startup_code().unwrap()),
            [Mov, Out, Xor, Out, Hlt]
        );
    }

    #[test]
    fn image_loads_with_embers_loader_and_has_the_pvh_entry() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let code = Workload::Pio.code(3).unwrap();
        let image = Workload::Pio.image(3).unwrap();
        let load =
            ember_boot::load_elf(&mem, &image, GuestAddress(ember_arch::layout::HIMEM_START))
                .unwrap();
        assert_eq!(load.pvh_entry, Some(GuestAddress(CODE_ADDR)));
        assert_eq!(load.entry, GuestAddress(CODE_ADDR));
        let mut loaded = vec![0u8; code.len()];
        mem.read_slice(&mut loaded, GuestAddress(CODE_ADDR))
            .unwrap();
        assert_eq!(loaded, code);
    }
}
