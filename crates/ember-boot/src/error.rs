//! One error type for callers that use several parts of the crate.

use crate::cmdline::CmdlineError;
use crate::configurator::linux::LinuxBootError;
use crate::configurator::pvh::PvhError;
use crate::e820::E820Error;
use crate::guest::GuestWriteError;
use crate::initrd::InitrdError;
use crate::loader::bzimage::BzImageError;
use crate::loader::elf::ElfError;
use crate::zero_page::ZeroPageError;

/// Any error of this crate: each module's own error, wrapped unchanged (its
/// message is the message of the module's error).
///
/// Every function returns its module's error type; this enum exists so that a
/// caller that loads a kernel and configures its boot in one function can use
/// `?` throughout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An ELF kernel was rejected or could not be loaded.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// A bzImage was rejected or could not be loaded.
    #[error(transparent)]
    BzImage(#[from] BzImageError),
    /// The zero page or command line for a 64-bit Linux boot could not be written.
    #[error(transparent)]
    LinuxBoot(#[from] LinuxBootError),
    /// The PVH start info could not be written.
    #[error(transparent)]
    Pvh(#[from] PvhError),
    /// A command line was refused or could not be written.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    /// An initrd could not be placed or loaded.
    #[error(transparent)]
    Initrd(#[from] InitrdError),
    /// No e820 map could be built from guest memory.
    #[error(transparent)]
    E820(#[from] E820Error),
    /// A zero page field could not be set.
    #[error(transparent)]
    ZeroPage(#[from] ZeroPageError),
    /// A write to guest memory failed.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}
