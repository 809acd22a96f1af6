//! Guests that flood the VMM's outputs: COM1 with a page of text per exit, or the
//! VMM's log with a request it warns about. The stall tests and the `signal-exit`
//! benchmark run them to check that neither output can stall a vCPU or keep a signal
//! from ending the VMM.
//!
//! Each guest is a flat ELF kernel ([`crate::elf::flat_elf`]): its code, then at
//! [`TEXT_ADDR`] a page of [`FLOOD_LINE`] repeated, for `rep outsb`.
//!
//! ```
//! use ember_guests::flood::{flood_com1, FLOOD_LINE};
//!
//! // 32 pages to COM1, then exit with code 9 through the debug-exit port.
//! let image = flood_com1(Some(32), 9).unwrap();
//! assert_eq!(&image[..4], b"\x7fELF");
//! assert!(image.windows(FLOOD_LINE.len()).any(|w| w == FLOOD_LINE));
//! ```

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use crate::asm::assemble;
use crate::elf::{flat_elf, GUEST_LOAD_ADDR};
use crate::GuestError;

/// The line a flooding guest's page of text repeats (64 bytes, so a page holds 64).
pub const FLOOD_LINE: &[u8] = b"flooding COM1 with no reader at all, one page at a time........\n";

/// Where the page of text is in guest memory: the page after the code.
pub const TEXT_ADDR: u64 = GUEST_LOAD_ADDR + CODE_BYTES;

/// Bytes the page of text holds, what one `rep outsb` sends.
pub const TEXT_BYTES: u32 = 4096;

/// Room for the code, before the text.
const CODE_BYTES: u64 = 0x1000;

/// COM1's data port.
const COM1: u16 = 0x3f8;
/// Ember's ACPI PM1a control register (sleep type in bits 10-12, `SLP_EN` bit 13).
const ACPI_PM1A_CONTROL: u16 = 0x600;
/// The byte written there to ask for sleep state S3: type 3, with `SLP_EN`. Ember
/// implements only S5 and warns about any other state, rate-limited.
const ACPI_S3_REQUEST: u32 = (3 << 2) | 0x20;
/// Ember's debug-exit port: the byte written becomes the VMM's exit status.
const DEBUG_EXIT: u32 = 0xf4;

/// A guest built by `build` (at [`GUEST_LOAD_ADDR`], at most a page of code), with the
/// page of text after it, as a flat ELF kernel.
///
/// ```
/// use ember_guests::flood::guest_with_text;
/// use iced_x86::code_asm::*;
///
/// let image = guest_with_text(|a| {
///     a.mov(al, 1)?;
///     a.out(0xf4, al)?;
///     a.hlt()
/// })
/// .unwrap();
/// assert_eq!(&image[..4], b"\x7fELF");
/// ```
pub fn guest_with_text(
    build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<Vec<u8>, GuestError> {
    let mut image = assemble(GUEST_LOAD_ADDR, build)?;
    if image.len() as u64 > CODE_BYTES {
        return Err(GuestError::CodeTooLarge {
            bytes: image.len(),
            room: CODE_BYTES,
        });
    }
    image.resize(CODE_BYTES as usize, 0xcc);
    image.extend(FLOOD_LINE.iter().cycle().take(TEXT_BYTES as usize));
    Ok(flat_elf(GUEST_LOAD_ADDR, &image, 0))
}

/// Sends the page of text to COM1 `pages` times (`None`: for ever) with `rep outsb`,
/// then exits with `code` through the debug-exit port.
///
/// ```
/// let image = ember_guests::flood::flood_com1(None, 0).unwrap();
/// assert_eq!(&image[..4], b"\x7fELF");
/// ```
pub fn flood_com1(pages: Option<u32>, code: u8) -> Result<Vec<u8>, GuestError> {
    guest_with_text(|a| {
        let mut again = a.create_label();
        a.cld()?;
        a.mov(ebx, pages.unwrap_or(0))?;
        a.set_label(&mut again)?;
        a.mov(dx, u32::from(COM1))?;
        a.mov(rsi, TEXT_ADDR)?;
        a.mov(ecx, TEXT_BYTES)?;
        a.rep().outsb()?;
        if pages.is_some() {
            a.dec(ebx)?;
            a.jnz(again)?;
        } else {
            a.jmp(again)?;
        }
        exit_with(a, code)
    })
}

/// Prints `g` and a newline on COM1, then asks for ACPI sleep state S3 (which Ember
/// warns about, rate-limited) in a loop: `times` times, then exits with `code` through
/// the debug-exit port; `None`: for ever.
///
/// ```
/// let image = ember_guests::flood::warn_in_a_loop(Some(1000), 42).unwrap();
/// assert_eq!(&image[..4], b"\x7fELF");
/// ```
pub fn warn_in_a_loop(times: Option<u32>, code: u8) -> Result<Vec<u8>, GuestError> {
    guest_with_text(|a| {
        let mut again = a.create_label();
        a.mov(dx, u32::from(COM1))?;
        a.mov(al, u32::from(b'g'))?;
        a.out(dx, al)?;
        a.mov(al, u32::from(b'\n'))?;
        a.out(dx, al)?;
        a.mov(ecx, times.unwrap_or(0))?;
        a.mov(dx, u32::from(ACPI_PM1A_CONTROL))?;
        a.mov(al, ACPI_S3_REQUEST)?;
        a.set_label(&mut again)?;
        a.out(dx, al)?;
        a.pause()?;
        if times.is_some() {
            a.dec(ecx)?;
            a.jnz(again)?;
        } else {
            a.jmp(again)?;
        }
        exit_with(a, code)
    })
}

/// Prints `i` and a newline on COM1, then halts for ever with interrupts off: a VM
/// whose vCPU sleeps in the kernel, the idle case.
///
/// ```
/// let image = ember_guests::flood::idle().unwrap();
/// assert_eq!(&image[..4], b"\x7fELF");
/// ```
pub fn idle() -> Result<Vec<u8>, GuestError> {
    guest_with_text(|a| {
        let mut again = a.create_label();
        a.mov(dx, u32::from(COM1))?;
        a.mov(al, u32::from(b'i'))?;
        a.out(dx, al)?;
        a.mov(al, u32::from(b'\n'))?;
        a.out(dx, al)?;
        a.cli()?;
        a.set_label(&mut again)?;
        a.hlt()?;
        a.jmp(again)
    })
}

fn exit_with(a: &mut CodeAssembler, code: u8) -> Result<(), IcedError> {
    a.mov(al, u32::from(code))?;
    a.out(DEBUG_EXIT, al)?;
    a.hlt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_follows_a_page_of_code() {
        let image = flood_com1(Some(1), 0).unwrap();
        let text = image
            .windows(TEXT_BYTES as usize)
            .position(|w| w.starts_with(FLOOD_LINE) && w.ends_with(FLOOD_LINE))
            .unwrap();
        let code = image
            .windows(3)
            .position(|w| w == [0xfc, 0xbb, 0x01])
            .unwrap();
        assert_eq!(text - code, CODE_BYTES as usize);
    }

    #[test]
    fn code_larger_than_a_page_is_refused() {
        let err = guest_with_text(|a| {
            for _ in 0..0x1001 {
                a.nop()?;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("4097 bytes of code"), "{err}");
    }
}
