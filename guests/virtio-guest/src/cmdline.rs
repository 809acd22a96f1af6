//! The kernel command line from the Linux zero page, and the `virtio_mmio.device=`
//! entries in it.

use alloc::vec::Vec;
use core::fmt;

/// Offset of `hdr.cmd_line_ptr` (u32) in the zero page.
const CMD_LINE_PTR: usize = 0x228;
/// Offset of `ext_cmd_line_ptr` (u32, the high 32 bits of the address) in the zero page.
const EXT_CMD_LINE_PTR: usize = 0x0c8;
/// Longest command line read (Linux's x86 `COMMAND_LINE_SIZE` is 2048).
const MAX_CMDLINE: usize = 64 * 1024;

/// Reads the NUL-terminated command line the zero page at `zero_page` points to.
/// Invalid UTF-8 ends it early.
///
/// # Safety
/// `zero_page` must be 0 or the identity-mapped address of a Linux zero page whose
/// command-line pointer is 0 or the identity-mapped address of a NUL-terminated string.
pub unsafe fn read(zero_page: u64) -> &'static str {
    if zero_page == 0 {
        return "";
    }
    let zp = zero_page as *const u8;
    // SAFETY: the caller's contract.
    let (lo, hi) = unsafe {
        (
            zp.add(CMD_LINE_PTR).cast::<u32>().read_unaligned(),
            zp.add(EXT_CMD_LINE_PTR).cast::<u32>().read_unaligned(),
        )
    };
    let addr = (u64::from(hi) << 32) | u64::from(lo);
    if addr == 0 {
        return "";
    }
    let start = addr as *const u8;
    let mut len = 0;
    // SAFETY: the caller's contract: the string is NUL-terminated.
    while len < MAX_CMDLINE && unsafe { start.add(len).read() } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes were just read; guest memory is never freed.
    let bytes = unsafe { core::slice::from_raw_parts(start, len) };
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        // SAFETY: from_utf8 checked the bytes up to valid_up_to.
        Err(e) => unsafe { core::str::from_utf8_unchecked(&bytes[..e.valid_up_to()]) },
    }
}

/// A virtio-mmio device from a `virtio_mmio.device=<size>@<addr>:<irq>[:<id>]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Size of the register window in bytes.
    pub size: u64,
    /// Guest physical address of the register window.
    pub addr: u64,
    /// The device's interrupt line.
    pub irq: u32,
}

impl fmt::Display for VirtioMmioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}, size {}, irq {}", self.addr, self.size, self.irq)
    }
}

/// Parses a number as Linux's `memparse` does: decimal, or hex with `0x`, then an
/// optional K, M or G suffix.
fn memparse(s: &str) -> Option<u64> {
    let (s, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let value = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => s.parse().ok()?,
    };
    value.checked_mul(1 << shift)
}

/// Parses the value of one `virtio_mmio.device=` entry.
pub fn parse_device(spec: &str) -> Option<VirtioMmioDevice> {
    let (size, rest) = spec.split_once('@')?;
    let (addr, rest) = rest.split_once(':')?;
    // An optional `:<platform device id>` follows the IRQ.
    let irq = rest.split_once(':').map_or(rest, |(irq, _id)| irq);
    Some(VirtioMmioDevice {
        size: memparse(size).filter(|&s| s > 0)?,
        addr: memparse(addr)?,
        irq: irq.parse().ok()?,
    })
}

/// The `virtio_mmio.device=` entries of a command line, in order. Entries that do not
/// parse are reported on the serial port and left out.
pub fn virtio_mmio_devices(cmdline: &str) -> Vec<VirtioMmioDevice> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix("virtio_mmio.device="))
        .filter_map(|spec| {
            let device = parse_device(spec);
            if device.is_none() {
                crate::println!("virtio-guest: cannot parse virtio_mmio.device={spec}");
            }
            device
        })
        .collect()
}

/// The value of the last `key=value` word of a command line, if any.
pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}
