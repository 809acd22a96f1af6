//! Checked writes into guest memory (from `ember_memory::checked_write`): every table
//! writer checks the whole range it is about to write first.

pub(crate) use ember_memory::checked_write::write_bytes;
pub use ember_memory::checked_write::GuestWriteError;
