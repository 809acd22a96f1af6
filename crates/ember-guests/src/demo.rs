//! The example VMM's embedded demo guest.
//!
//! Every vCPU starts at the entry point in 64-bit mode (the VMM marks them all
//! runnable). Each reads its APIC ID from CPUID, sets its bit in an "online" mask and
//! bumps a counter, both with locked instructions; the others then park in `hlt`. The
//! vCPU with APIC ID 0 waits (bounded) until as many vCPUs checked in as CPUID leaf 1
//! reports, sums the e820 map in the Linux zero page (`RSI` at entry): all entries,
//! and the usable-RAM ones; then prints what it found on the serial port, signals boot-done and exits with
//! code 0 through the debug-exit port. If a virtio-mmio block device sits in the first
//! slots of Ember's device window, it first reads sector 0 through it (one split queue,
//! polled; the device is found by probing the slots for the virtio magic value) and
//! prints the sector's first bytes. Output:
//!
//! ```text
//! Ember demo guest: running in 64-bit mode
//! Ember demo guest: 2 of 2 vCPUs online, APIC IDs: 0 1
//! Ember demo guest: 512 MiB in the e820 map, 523903 KiB of it usable RAM
//! Ember demo guest: virtio-blk sector 0: Hello from the disk..............
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

/// Where the demo looks for virtio-mmio devices: Ember's device MMIO window, one 4 KiB
/// slot each.
pub const VIRTIO_MMIO_BASE: u64 = ember_arch::layout::DEVICE_MMIO_START;
/// How many slots it probes.
const VIRTIO_SLOTS: u32 = 16;
/// How many bytes of sector 0 it prints.
pub const SECTOR_BYTES_SHOWN: u32 = 32;

// Guest-physical scratch for the virtqueue and the request (low RAM, below the EBDA,
// clear of the zero page, page tables and command line).
const VQ_DESC: u32 = 0x4_0000;
const VQ_AVAIL: u32 = 0x4_1000;
const VQ_USED: u32 = 0x4_2000;
const REQ_HEADER: u32 = 0x4_3000;
const REQ_DATA: u32 = 0x4_3200;
const REQ_STATUS: u32 = 0x4_3400;
const QUEUE_SIZE: u32 = 8;

// virtio-mmio registers and status bits.
const MMIO_MAGIC: u32 = 0x7472_6976;
const REG_DEVICE_ID: i32 = 0x008;
const REG_DRIVER_FEATURES: i32 = 0x020;
const REG_DRIVER_FEATURES_SEL: i32 = 0x024;
const REG_QUEUE_SEL: i32 = 0x030;
const REG_QUEUE_NUM: i32 = 0x038;
const REG_QUEUE_READY: i32 = 0x044;
const REG_QUEUE_NOTIFY: i32 = 0x050;
const REG_STATUS: i32 = 0x070;
const REG_QUEUE_DESC: i32 = 0x080;
const REG_QUEUE_DRIVER: i32 = 0x090;
const REG_QUEUE_DEVICE: i32 = 0x0a0;
const STATUS_ACK_DRIVER: u32 = 1 | 2;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const DESC_F_NEXT: u32 = 1;
const DESC_F_WRITE: u32 = 2;

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
            Text {
                label,
                len: text.len(),
            }
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
        let s_blk = string(a, b"virtio-blk sector 0: ");
        let s_blk_failed = string(a, b"virtio-blk read failed\n");

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

        let print = |a: &mut CodeAssembler, text: Text| -> Result<(), IcedError> {
            a.lea(rsi, ptr(text.label))?;
            a.mov(ecx, text.len as u32)?;
            a.call(print_str)
        };
        // "running in 64-bit mode"
        print(a, s_prefix)?;
        print(a, s_running)?;
        // "<n> of <m> vCPUs online, APIC IDs: ..."
        print(a, s_prefix)?;
        a.mov(rax, qword_ptr(online_count))?;
        a.call(print_dec)?;
        print(a, s_of)?;
        a.mov(eax, r13d)?;
        a.call(print_dec)?;
        print(a, s_online)?;
        a.xor(r9d, r9d)?;
        a.set_label(&mut id_loop)?;
        a.mov(r8, qword_ptr(online_mask))?;
        a.bt(r8, r9)?;
        a.jnc(id_next)?;
        print(a, s_space)?;
        a.mov(rax, r9)?;
        a.call(print_dec)?;
        a.set_label(&mut id_next)?;
        a.inc(r9d)?;
        a.cmp(r9d, 64u32)?;
        a.jb(id_loop)?;
        print(a, s_newline)?;
        // "<total> MiB in the e820 map, <ram> KiB of it usable RAM"
        print(a, s_prefix)?;
        a.mov(rax, rbp)?;
        a.shr(rax, 20u32)?;
        a.call(print_dec)?;
        print(a, s_ram)?;
        a.mov(rax, r14)?;
        a.shr(rax, 10u32)?;
        a.call(print_dec)?;
        print(a, s_usable)?;
        let blk = BlkStrings {
            prefix: s_prefix,
            sector: s_blk,
            failed: s_blk_failed,
            newline: s_newline,
        };
        virtio_blk_read(a, print_str, &blk)?;
        print(a, s_prefix)?;
        print(a, s_done)?;
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

/// Finds a virtio-mmio block device in the first [`VIRTIO_SLOTS`] slots and reads
/// sector 0 through it, printing its first [`SECTOR_BYTES_SHOWN`] bytes (non-printable
/// ones as '.'). Prints nothing when there is no block device. `print_str` prints
/// `RCX` bytes at `RSI`.
fn virtio_blk_read(
    a: &mut CodeAssembler,
    print_str: CodeLabel,
    labels: &BlkStrings,
) -> Result<(), IcedError> {
    let print = |a: &mut CodeAssembler, text: Text| -> Result<(), IcedError> {
        a.lea(rsi, ptr(text.label))?;
        a.mov(ecx, text.len as u32)?;
        a.call(print_str)
    };
    let reg =
        |a: &mut CodeAssembler, offset: i32, value: u32| a.mov(dword_ptr(rbx + offset), value);
    let mut scan = a.create_label();
    let mut next = a.create_label();
    let mut found = a.create_label();
    let mut poll = a.create_label();
    let mut io_done = a.create_label();
    let mut clean = a.create_label();
    let mut replace = a.create_label();
    let mut keep = a.create_label();
    let mut failed = a.create_label();
    let mut done = a.create_label();

    a.mov(rbx, VIRTIO_MMIO_BASE)?;
    a.mov(ecx, VIRTIO_SLOTS)?;
    a.set_label(&mut scan)?;
    a.cmp(dword_ptr(rbx), MMIO_MAGIC)?;
    a.jne(next)?;
    a.cmp(dword_ptr(rbx + REG_DEVICE_ID), 2u32)?;
    a.je(found)?;
    a.set_label(&mut next)?;
    a.add(rbx, 0x1000i32)?;
    a.dec(ecx)?;
    a.jnz(scan)?;
    a.jmp(done)?;

    // Driver initialisation (virtio 1.2, 3.1.1): reset, ACK|DRIVER, features
    // (VERSION_1 only), FEATURES_OK (checked), queue 0, DRIVER_OK.
    a.set_label(&mut found)?;
    reg(a, REG_STATUS, 0)?;
    reg(a, REG_STATUS, STATUS_ACK_DRIVER)?;
    reg(a, REG_DRIVER_FEATURES_SEL, 1)?;
    reg(a, REG_DRIVER_FEATURES, 1)?; // bit 32: VIRTIO_F_VERSION_1
    reg(a, REG_DRIVER_FEATURES_SEL, 0)?;
    reg(a, REG_DRIVER_FEATURES, 0)?;
    reg(a, REG_STATUS, STATUS_ACK_DRIVER | STATUS_FEATURES_OK)?;
    a.mov(eax, dword_ptr(rbx + REG_STATUS))?;
    a.test(eax, STATUS_FEATURES_OK)?;
    a.jz(failed)?;
    reg(a, REG_QUEUE_SEL, 0)?;
    reg(a, REG_QUEUE_NUM, QUEUE_SIZE)?;
    reg(a, REG_QUEUE_DESC, VQ_DESC)?;
    reg(a, REG_QUEUE_DESC + 4, 0)?;
    reg(a, REG_QUEUE_DRIVER, VQ_AVAIL)?;
    reg(a, REG_QUEUE_DRIVER + 4, 0)?;
    reg(a, REG_QUEUE_DEVICE, VQ_USED)?;
    reg(a, REG_QUEUE_DEVICE + 4, 0)?;
    reg(a, REG_QUEUE_READY, 1)?;
    reg(
        a,
        REG_STATUS,
        STATUS_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    )?;

    // Request: header {type IN, reserved, sector 0}, 512 data bytes, status byte.
    a.mov(rdi, u64::from(REQ_HEADER))?;
    a.mov(qword_ptr(rdi), 0i32)?;
    a.mov(qword_ptr(rdi + 8), 0i32)?;
    a.mov(rdi, u64::from(REQ_STATUS))?;
    a.mov(byte_ptr(rdi), 0xffu32)?;
    a.mov(rdi, u64::from(VQ_DESC))?;
    let chain = [
        (REQ_HEADER, 16, DESC_F_NEXT),
        (REQ_DATA, 512, DESC_F_NEXT | DESC_F_WRITE),
        (REQ_STATUS, 1, DESC_F_WRITE),
    ];
    for (i, (addr, len, flags)) in chain.into_iter().enumerate() {
        let d = 16 * i as i32;
        let next = if flags & DESC_F_NEXT != 0 {
            i as u32 + 1
        } else {
            0
        };
        a.mov(qword_ptr(rdi + d), addr as i32)?;
        a.mov(dword_ptr(rdi + d + 8), len as u32)?;
        a.mov(word_ptr(rdi + d + 12), flags)?;
        a.mov(word_ptr(rdi + d + 14), next)?;
    }
    // Avail ring: flags 0, ring[0] = descriptor 0, then idx = 1; then notify queue 0.
    a.mov(rdi, u64::from(VQ_AVAIL))?;
    a.mov(word_ptr(rdi), 0u32)?;
    a.mov(word_ptr(rdi + 4), 0u32)?;
    a.mov(word_ptr(rdi + 2), 1u32)?;
    reg(a, REG_QUEUE_NOTIFY, 0)?;
    // Poll the used ring's idx (bounded).
    a.mov(rsi, u64::from(VQ_USED))?;
    a.mov(ecx, 1_000_000u32)?;
    a.set_label(&mut poll)?;
    a.cmp(word_ptr(rsi + 2), 1u32)?;
    a.je(io_done)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(poll)?;
    a.jmp(failed)?;

    a.set_label(&mut io_done)?;
    a.mov(rdi, u64::from(REQ_STATUS))?;
    a.cmp(byte_ptr(rdi), 0u32)?;
    a.jne(failed)?;
    // Make the bytes shown printable, in place.
    a.mov(rdi, u64::from(REQ_DATA))?;
    a.mov(ecx, SECTOR_BYTES_SHOWN)?;
    a.set_label(&mut clean)?;
    a.mov(al, byte_ptr(rdi))?;
    a.cmp(al, 0x20u32)?;
    a.jb(replace)?;
    a.cmp(al, 0x7fu32)?;
    a.jb(keep)?;
    a.set_label(&mut replace)?;
    a.mov(byte_ptr(rdi), u32::from(b'.'))?;
    a.set_label(&mut keep)?;
    a.inc(rdi)?;
    a.dec(ecx)?;
    a.jnz(clean)?;
    print(a, labels.prefix)?;
    print(a, labels.sector)?;
    a.mov(rsi, u64::from(REQ_DATA))?;
    a.mov(ecx, SECTOR_BYTES_SHOWN)?;
    a.call(print_str)?;
    print(a, labels.newline)?;
    a.jmp(done)?;

    a.set_label(&mut failed)?;
    print(a, labels.prefix)?;
    print(a, labels.failed)?;
    // The caller's next instruction carries this label.
    a.set_label(&mut done)?;
    Ok(())
}

/// A string in the guest image.
#[derive(Clone, Copy)]
struct Text {
    label: CodeLabel,
    len: usize,
}

/// The strings [`virtio_blk_read`] prints.
struct BlkStrings {
    prefix: Text,
    sector: Text,
    failed: Text,
    newline: Text,
}
