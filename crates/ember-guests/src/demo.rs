//! The example VMM's embedded demo guest.
//!
//! Every vCPU starts at the entry point in 64-bit mode (the VMM marks them all
//! runnable). Each reads its APIC ID from CPUID, sets its bit in an "online" mask and
//! bumps a counter, both with locked instructions; the others then park in `hlt`. The
//! vCPU with APIC ID 0 waits (bounded) until as many vCPUs checked in as CPUID leaf 1
//! reports, sums the e820 map in the Linux zero page (`RSI` at entry): all entries,
//! and the usable-RAM ones; then prints what it found on the serial port, signals boot-done and exits with
//! code 0 through the debug-exit port. Output:
//!
//! ```text
//! Ember demo guest: running in 64-bit mode
//! Ember demo guest: 2 of 2 vCPUs online, APIC IDs: 0 1
//! Ember demo guest: 512 MiB in the e820 map, 523903 KiB of it usable RAM
//! Ember demo guest: done, exiting with code 0
//! ```

use iced_x86::code_asm::*;

use crate::asm::assemble;
use crate::elf::{flat_elf, GUEST_LOAD_ADDR};
use crate::GuestError;

/// The ports the demo guest talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoPorts {
    /// Base of a 16550 UART (transmit register at offset 0).
    pub serial: u16,
    /// Debug-exit port: the byte written is the VMM's exit code.
    pub debug_exit: u16,
    /// Boot-done port.
    pub boot_done: u16,
    /// The value that means "boot done".
    pub boot_done_magic: u8,
}

/// How long the boot vCPU waits for the others to check in, in loop iterations
/// (about 6 emulated instructions each; roughly a second at worst on nested KVM).
const CHECK_IN_SPINS: u32 = 200_000;

const PREFIX: &[u8] = b"Ember demo guest: ";

/// Builds the demo guest as an ELF image linked at [`GUEST_LOAD_ADDR`].
///
/// ```
/// let ports = ember_guests::demo::DemoPorts {
///     serial: 0x3f8, debug_exit: 0xf4, boot_done: 0xf5, boot_done_magic: 123,
/// };
/// let image = ember_guests::demo::demo_elf(&ports).unwrap();
/// assert_eq!(&image[..4], b"\x7fELF");
/// ```
pub fn demo_elf(ports: &DemoPorts) -> Result<Vec<u8>, GuestError> {
    let code = assemble(GUEST_LOAD_ADDR, |a| {
        let mut start = a.create_label();
        let mut online_count = a.create_label();
        let mut online_mask = a.create_label();
        let mut numbuf_end = a.create_label();
        let mut print_str = a.create_label();
        let mut print_dec = a.create_label();
        let mut ap_park = a.create_label();
        let mut wait_loop = a.create_label();
        let mut wait_done = a.create_label();
        let mut e820_loop = a.create_label();
        let mut e820_skip = a.create_label();
        let mut e820_done = a.create_label();
        let mut id_loop = a.create_label();
        let mut id_next = a.create_label();
        let mut halt = a.create_label();

        let mut strings = Vec::new();
        let mut string = |a: &mut CodeAssembler, text: &'static [u8]| {
            let label = a.create_label();
            strings.push((label, text));
            label
        };
        let s_prefix = string(a, PREFIX);
        let s_running = string(a, b"running in 64-bit mode\n");
        let s_of = string(a, b" of ");
        let s_online = string(a, b" vCPUs online, APIC IDs:");
        let s_space = string(a, b" ");
        let s_newline = string(a, b"\n");
        let s_ram = string(a, b" MiB in the e820 map, ");
        let s_usable = string(a, b" KiB of it usable RAM\n");
        let s_done = string(a, b"done, exiting with code 0\n");

        // Entry. Keep the shared counters at an 8-byte-aligned spot at the start, so the
        // locked accesses never split a cache line.
        a.jmp(start)?;
        a.db(&[0x90; 6])?;
        a.set_label(&mut online_count)?;
        a.dq(&[0])?;
        a.set_label(&mut online_mask)?;
        a.dq(&[0])?;
        a.db(&[0; 24])?;
        a.set_label(&mut numbuf_end)?;
        a.db(&[0; 8])?;

        a.set_label(&mut start)?;
        a.mov(r15, rsi)?; // zero page
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 24u32)?;
        a.mov(r12d, ebx)?; // APIC ID
        a.lock().bts(qword_ptr(online_mask), r12)?;
        a.lock().inc(qword_ptr(online_count))?;
        a.test(r12d, r12d)?;
        a.jnz(ap_park)?;

        // Boot vCPU: wait for the vCPU count CPUID.1:EBX[23:16] reports.
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 16u32)?;
        a.and(ebx, 0xffu32)?;
        a.mov(r13d, ebx)?;
        a.mov(ecx, CHECK_IN_SPINS)?;
        a.set_label(&mut wait_loop)?;
        a.mov(eax, dword_ptr(online_count))?;
        a.cmp(eax, r13d)?;
        a.jae(wait_done)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(wait_loop)?;
        a.set_label(&mut wait_done)?;

        // Sum the e820 map (count at 0x1e8, table at 0x2d0, 20 bytes each): R14 = RAM
        // (type 1) entries, RBP = all entries.
        a.xor(r14d, r14d)?;
        a.xor(ebp, ebp)?;
        a.movzx(ecx, byte_ptr(r15 + 0x1e8))?;
        a.lea(rdx, ptr(r15 + 0x2d0))?;
        a.set_label(&mut e820_loop)?;
        a.test(ecx, ecx)?;
        a.jz(e820_done)?;
        a.add(rbp, qword_ptr(rdx + 8))?;
        a.cmp(dword_ptr(rdx + 16), 1u32)?;
        a.jne(e820_skip)?;
        a.add(r14, qword_ptr(rdx + 8))?;
        a.set_label(&mut e820_skip)?;
        a.add(rdx, 20i32)?;
        a.dec(ecx)?;
        a.jmp(e820_loop)?;
        a.set_label(&mut e820_done)?;

        let print =
            |a: &mut CodeAssembler, label: CodeLabel, len: usize| -> Result<(), IcedError> {
                a.lea(rsi, ptr(label))?;
                a.mov(ecx, len as u32)?;
                a.call(print_str)
            };
        // "running in 64-bit mode"
        print(a, s_prefix, PREFIX.len())?;
        print(a, s_running, 23)?;
        // "<n> of <m> vCPUs online, APIC IDs: ..."
        print(a, s_prefix, PREFIX.len())?;
        a.mov(rax, qword_ptr(online_count))?;
        a.call(print_dec)?;
        print(a, s_of, 4)?;
        a.mov(eax, r13d)?;
        a.call(print_dec)?;
        print(a, s_online, 24)?;
        a.xor(r9d, r9d)?;
        a.set_label(&mut id_loop)?;
        a.mov(r8, qword_ptr(online_mask))?;
        a.bt(r8, r9)?;
        a.jnc(id_next)?;
        print(a, s_space, 1)?;
        a.mov(rax, r9)?;
        a.call(print_dec)?;
        a.set_label(&mut id_next)?;
        a.inc(r9d)?;
        a.cmp(r9d, 64u32)?;
        a.jb(id_loop)?;
        print(a, s_newline, 1)?;
        // "<total> MiB in the e820 map, <ram> KiB of it usable RAM"
        print(a, s_prefix, PREFIX.len())?;
        a.mov(rax, rbp)?;
        a.shr(rax, 20u32)?;
        a.call(print_dec)?;
        print(a, s_ram, 22)?;
        a.mov(rax, r14)?;
        a.shr(rax, 10u32)?;
        a.call(print_dec)?;
        print(a, s_usable, 22)?;
        print(a, s_prefix, PREFIX.len())?;
        print(a, s_done, 26)?;
        // Boot done, then exit with code 0.
        a.mov(al, ports.boot_done_magic as u32)?;
        a.mov(dx, ports.boot_done as u32)?;
        a.out(dx, al)?;
        a.xor(eax, eax)?;
        a.mov(dx, ports.debug_exit as u32)?;
        a.out(dx, al)?;
        a.set_label(&mut halt)?;
        a.hlt()?;
        a.jmp(halt)?;

        a.set_label(&mut ap_park)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(ap_park)?;

        // print_str: RSI = text, RCX = length.
        a.set_label(&mut print_str)?;
        a.mov(dx, ports.serial as u32)?;
        a.rep().outsb()?;
        a.ret()?;

        // print_dec: RAX = value, printed in decimal.
        let mut digit = a.create_label();
        a.set_label(&mut print_dec)?;
        a.lea(rdi, ptr(numbuf_end))?;
        a.mov(ebx, 10u32)?;
        a.set_label(&mut digit)?;
        a.xor(edx, edx)?;
        a.div(rbx)?;
        a.add(dl, b'0' as u32)?;
        a.dec(rdi)?;
        a.mov(byte_ptr(rdi), dl)?;
        a.test(rax, rax)?;
        a.jnz(digit)?;
        a.lea(rcx, ptr(numbuf_end))?;
        a.sub(rcx, rdi)?;
        a.mov(rsi, rdi)?;
        a.mov(dx, ports.serial as u32)?;
        a.rep().outsb()?;
        a.ret()?;

        for (mut label, text) in strings {
            a.set_label(&mut label)?;
            a.db(text)?;
        }
        Ok(())
    })?;
    Ok(flat_elf(GUEST_LOAD_ADDR, &code, 0))
}
