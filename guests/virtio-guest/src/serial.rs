//! Output on COM1 (port 0x3f8): a byte per `out`, each a PIO exit to the VMM.

use core::arch::asm;
use core::fmt::{self, Write};

/// COM1's data register.
const COM1: u16 = 0x3f8;

/// A writer to the serial port.
pub struct Serial;

impl Serial {
    /// Writes one byte.
    pub fn write_byte(&mut self, byte: u8) {
        // SAFETY: a port write; RFLAGS.IOPL = 3 lets user mode do it.
        unsafe {
            asm!("out dx, al", in("dx") COM1, in("al") byte, options(nomem, nostack, preserves_flags))
        };
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            self.write_byte(byte);
        }
        Ok(())
    }
}

/// Writes formatted text to the serial port.
pub fn print(args: fmt::Arguments<'_>) {
    let _ = Serial.write_fmt(args);
}

/// Like `std`'s `println!`, to the serial port.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::serial::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
