//! Small x86-64 guests assembled in Rust with iced-x86, for Ember's demo, tests and
//! benchmarks, plus the guard every KVM test calls first.
//!
//! Guest kernel-mode code is emulated instruction by instruction on nested KVM hosts
//! (about 1 us per instruction), so the guests here are short, use no SSE, and loop
//! only where a test needs a loop.
//!
//! ```
//! use ember_guests::{asm, elf};
//! use iced_x86::code_asm::*;
//!
//! // out 0xf4, al with al = 7: "exit with code 7" on Ember's debug-exit port.
//! let code = asm::assemble(elf::GUEST_LOAD_ADDR, |a| {
//!     a.mov(al, 7)?;
//!     a.out(0xf4, al)?;
//!     a.hlt()
//! })
//! .unwrap();
//! let image = elf::flat_elf(elf::GUEST_LOAD_ADDR, &code, 0);
//! assert_eq!(&image[..4], b"\x7fELF");
//! ```

#![deny(missing_docs)]

pub mod asm;
pub mod demo;
pub mod elf;
pub mod flood;
pub mod rust_guest;
pub mod testing;

/// Errors from assembling or building a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// iced-x86 refused the code.
    #[error("cannot assemble the guest: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    /// The code does not fit the room its image leaves for it.
    #[error("{bytes} bytes of code do not fit in the {room} bytes before the guest's data")]
    CodeTooLarge {
        /// The size of the code.
        bytes: usize,
        /// The room for it.
        room: u64,
    },
    /// Building a Rust guest ([`rust_guest::build_guest`]) failed.
    #[error("cannot build the Rust guest {guest} ({status}):\n{stderr_tail}")]
    Build {
        /// The guest's name (its directory under `guests/`).
        guest: String,
        /// How the build ended: cargo's exit status, or why it could not run.
        status: String,
        /// The last lines of cargo's stderr.
        stderr_tail: String,
    },
}
