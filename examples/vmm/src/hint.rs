//! What to tell a user whose guest stopped on an instruction KVM could not emulate.

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Mnemonic};

/// Decodes the instruction (as 64-bit code) and returns its text and advice.
pub fn emulation_advice(bytes: &[u8]) -> (String, &'static str) {
    let mut decoder = Decoder::new(64, bytes, DecoderOptions::NONE);
    if bytes.is_empty() || !decoder.can_decode() {
        return (
            "unknown instruction".to_string(),
            "the instruction could not be read (code outside guest RAM?)",
        );
    }
    let insn = decoder.decode();
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    let advice = match insn.mnemonic() {
        Mnemonic::Cmpxchg16b => "hide CMPXCHG16B from the guest with --cpu-template nested-compat",
        Mnemonic::Xsave
        | Mnemonic::Xsave64
        | Mnemonic::Xsaveopt
        | Mnemonic::Xsaveopt64
        | Mnemonic::Xsavec
        | Mnemonic::Xsavec64
        | Mnemonic::Xsaves
        | Mnemonic::Xsaves64
        | Mnemonic::Xrstor
        | Mnemonic::Xrstor64
        | Mnemonic::Xrstors
        | Mnemonic::Xrstors64
        | Mnemonic::Xsetbv => {
            "add noxsave to the kernel command line (--cpu-template nested-compat does it)"
        }
        Mnemonic::Clac | Mnemonic::Stac => {
            "hide SMAP with clearcpuid=smap on the kernel command line \
             (--cpu-template nested-compat does it)"
        }
        Mnemonic::Int3 | Mnemonic::Wait => {
            "the instruction fallback completes this instruction on hosts that cannot \
             emulate it: use --cpu-template nested-compat (auto picks it on such hosts)"
        }
        Mnemonic::Popcnt => {
            "hide POPCNT with clearcpuid=popcnt on the kernel command line \
             (--cpu-template nested-compat does it)"
        }
        _ if insn.op_count() > 0 && is_vector(&insn) => {
            "SSE/AVX code cannot be emulated in guest kernel mode here; run it in user mode \
             or on a host with hardware KVM"
        }
        _ => "run the guest on a host with hardware KVM",
    };
    (text, advice)
}

fn is_vector(insn: &iced_x86::Instruction) -> bool {
    (0..insn.op_count()).any(|i| {
        let reg = insn.op_register(i);
        reg.is_xmm() || reg.is_ymm() || reg.is_zmm()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_per_instruction() {
        let (text, advice) = emulation_advice(&[0x48, 0x0f, 0xc7, 0x0e]);
        assert_eq!(text, "cmpxchg16b [rsi]");
        assert!(advice.contains("nested-compat"));
        let (text, advice) = emulation_advice(&[0x0f, 0xae, 0x2f]);
        assert!(text.starts_with("xrstor"), "{text}");
        assert!(advice.contains("noxsave"));
        let (text, advice) = emulation_advice(&[0xcc]);
        assert_eq!(text, "int3");
        assert!(advice.contains("instruction fallback"));
        let (text, advice) = emulation_advice(&[0x9b]);
        assert_eq!(text, "fwait");
        assert!(advice.contains("nested-compat"));
        let (text, advice) = emulation_advice(&[0xf3, 0x48, 0x0f, 0xb8, 0xc0]);
        assert_eq!(text, "popcnt rax,rax");
        assert!(advice.contains("clearcpuid=popcnt"));
        let (text, advice) = emulation_advice(&[0x0f, 0x57, 0xc0]);
        assert_eq!(text, "xorps xmm0,xmm0");
        assert!(advice.contains("SSE"));
        let (_, advice) = emulation_advice(&[]);
        assert!(advice.contains("could not be read"));
        let (text, _) = emulation_advice(&[0x0f]);
        assert!(!text.is_empty());
    }
}
