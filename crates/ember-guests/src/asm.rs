//! Assembling 64-bit guest code.

use iced_x86::code_asm::CodeAssembler;
use iced_x86::IcedError;

use crate::GuestError;

/// Assembles 64-bit code that will run at guest address `base`.
///
/// ```
/// use iced_x86::code_asm::*;
/// let code = ember_guests::asm::assemble(0x10_0000, |a| a.hlt()).unwrap();
/// assert_eq!(code, [0xf4]);
/// ```
pub fn assemble(
    base: u64,
    build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<Vec<u8>, GuestError> {
    let mut a = CodeAssembler::new(64)?;
    build(&mut a)?;
    Ok(a.assemble(base)?)
}
