//! The guests: a loop of `N` port or MMIO writes, then `hlt`.
//!
//! They run at CPL0, which nested KVM hosts emulate instruction by instruction, so the
//! loop is as short as it can be: the access, `dec ecx`, `jnz`.

use ember_guests::asm::assemble;
use ember_guests::GuestError;
use iced_x86::code_asm::*;

use crate::device::{MMIO_BASE, PIO_BASE};

/// Guest address the code is loaded at and entered.
pub const CODE_ADDR: u64 = 0x10_0000;

/// What the guest does in its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `out dx, al` to [`Workload::address`]: a 1-byte PIO write exit.
    Pio,
    /// `mov [rbx], eax` to [`Workload::address`]: a 4-byte MMIO write exit.
    Mmio,
}

impl Workload {
    /// Both workloads, in the order they are reported.
    pub const ALL: [Workload; 2] = [Workload::Pio, Workload::Mmio];

    /// A short name for tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Pio => "PIO write (out dx, al)",
            Workload::Mmio => "MMIO write (mov [rbx], eax)",
        }
    }

    /// The port or guest physical address the guest writes to.
    pub fn address(self) -> u64 {
        match self {
            Workload::Pio => PIO_BASE,
            Workload::Mmio => MMIO_BASE,
        }
    }

    /// Assembles the guest for `iterations` writes (0 means none: straight to `hlt`),
    /// to be loaded at [`CODE_ADDR`].
    pub fn code(self, iterations: u32) -> Result<Vec<u8>, GuestError> {
        let addr = self.address();
        assemble(CODE_ADDR, |a| {
            let mut top = a.create_label();
            let mut done = a.create_label();
            a.mov(ecx, iterations)?;
            a.mov(eax, 0x2au32)?;
            match self {
                Workload::Pio => a.mov(edx, addr as u32)?,
                Workload::Mmio => a.mov(rbx, addr)?,
            }
            a.test(ecx, ecx)?;
            a.jz(done)?;
            a.set_label(&mut top)?;
            match self {
                Workload::Pio => a.out(dx, al)?,
                Workload::Mmio => a.mov(dword_ptr(rbx), eax)?,
            }
            a.dec(ecx)?;
            a.jnz(top)?;
            a.set_label(&mut done)?;
            a.hlt()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn mnemonics(code: &[u8]) -> Vec<Mnemonic> {
        Decoder::with_ip(64, code, CODE_ADDR, DecoderOptions::NONE)
            .into_iter()
            .map(|i| i.mnemonic())
            .collect()
    }

    #[test]
    fn loops_are_access_dec_jnz_then_hlt() {
        use Mnemonic::*;
        let pio = Workload::Pio.code(5).unwrap();
        assert_eq!(
            mnemonics(&pio),
            [Mov, Mov, Mov, Test, Je, Out, Dec, Jne, Hlt]
        );
        let mmio = Workload::Mmio.code(5).unwrap();
        assert_eq!(
            mnemonics(&mmio),
            [Mov, Mov, Mov, Test, Je, Mov, Dec, Jne, Hlt]
        );
    }
}
