//! Checked writes into guest memory (from `ember_memory::checked_write`): every loader
//! and configurator checks the whole range it is about to write first.

pub use ember_memory::checked_write::GuestWriteError;
pub(crate) use ember_memory::checked_write::{
    check_range, range_in_memory, write_bytes, write_zeros,
};
