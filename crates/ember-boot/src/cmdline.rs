//! The kernel command line.

use std::fmt;

use ember_arch::layout::CMDLINE_MAX_SIZE;
use vm_memory::{GuestAddress, GuestMemory};

use crate::guest::{write_bytes, GuestWriteError};

/// Why a command line was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// A command line was created with no room even for its NUL.
    #[error("command line capacity must be at least 1 (room for the terminating NUL)")]
    ZeroCapacity,
    /// The command line, with its NUL, would exceed its capacity.
    #[error("command line of {len} bytes (with NUL) exceeds the limit of {limit} bytes")]
    TooLong {
        /// Length the command line would have, including the NUL.
        len: usize,
        /// The limit, including the NUL.
        limit: usize,
    },
    /// The text to add contains a NUL byte.
    #[error("command line text contains a NUL byte at position {position}")]
    ContainsNul {
        /// Byte position of the NUL within the added text.
        position: usize,
    },
    /// The text to add contains a byte that is not printable ASCII.
    #[error(
        "command line text contains byte {byte:#04x} at position {position}, \
         which is not printable ASCII"
    )]
    NonPrintable {
        /// The offending byte.
        byte: u8,
        /// Byte position within the added text.
        position: usize,
    },
    /// The command line could not be written to guest memory.
    #[error(transparent)]
    Memory(#[from] GuestWriteError),
}

/// A kernel command line under construction, bounded by a capacity.
///
/// The capacity counts the terminating NUL, as the kernel's
/// `COMMAND_LINE_SIZE` does. The line only ever holds printable ASCII
/// (`0x20..=0x7e`); parameters are separated by single spaces.
///
/// # Example
///
/// ```
/// use ember_boot::cmdline::Cmdline;
///
/// let mut cmdline = Cmdline::new(32)?;
/// cmdline.insert_str("console=ttyS0")?;
/// cmdline.insert_str("panic=1")?;
/// assert_eq!(cmdline.as_str(), "console=ttyS0 panic=1");
/// assert_eq!(cmdline.as_cstring_bytes(), b"console=ttyS0 panic=1\0");
/// assert!(cmdline.insert_str("root=/dev/vda rw").is_err()); // 39 bytes > 32
/// # Ok::<(), ember_boot::cmdline::CmdlineError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    line: String,
    capacity: usize,
}

impl Cmdline {
    /// Creates an empty command line holding at most `capacity` bytes,
    /// including the terminating NUL.
    ///
    /// # Errors
    ///
    /// [`CmdlineError::ZeroCapacity`] if `capacity` is 0: there would be
    /// no room for the NUL.
    pub fn new(capacity: usize) -> Result<Self, CmdlineError> {
        if capacity == 0 {
            return Err(CmdlineError::ZeroCapacity);
        }
        Ok(Self {
            line: String::new(),
            capacity,
        })
    }

    /// Appends `s`, separated from what is already there by a single space.
    ///
    /// Appending an empty string does nothing. On error the command line is
    /// unchanged.
    ///
    /// # Errors
    ///
    /// [`CmdlineError::ContainsNul`] or [`CmdlineError::NonPrintable`]
    /// if `s` holds a byte outside printable ASCII, and
    /// [`CmdlineError::TooLong`] if the result, with its NUL, would exceed
    /// the capacity.
    pub fn insert_str(&mut self, s: &str) -> Result<(), CmdlineError> {
        for (position, &byte) in s.as_bytes().iter().enumerate() {
            if byte == 0 {
                return Err(CmdlineError::ContainsNul { position });
            }
            if !(0x20..=0x7e).contains(&byte) {
                return Err(CmdlineError::NonPrintable { byte, position });
            }
        }
        if s.is_empty() {
            return Ok(());
        }
        let separator = usize::from(!self.line.is_empty());
        // Saturating: a length near usize::MAX is "too long" either way.
        let len = self
            .line
            .len()
            .saturating_add(separator)
            .saturating_add(s.len())
            .saturating_add(1);
        if len > self.capacity {
            return Err(CmdlineError::TooLong {
                len,
                limit: self.capacity,
            });
        }
        if separator == 1 {
            self.line.push(' ');
        }
        self.line.push_str(s);
        Ok(())
    }

    /// The command line, without a NUL.
    pub fn as_str(&self) -> &str {
        &self.line
    }

    /// The command line followed by its terminating NUL, as the guest sees it.
    pub fn as_cstring_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.line.len() + 1);
        bytes.extend_from_slice(self.line.as_bytes());
        bytes.push(0);
        bytes
    }

    /// Length of the command line in bytes, without the NUL.
    pub fn len(&self) -> usize {
        self.line.len()
    }

    /// Whether the command line is empty.
    pub fn is_empty(&self) -> bool {
        self.line.is_empty()
    }

    /// The capacity in bytes, including the NUL.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Default for Cmdline {
    /// An empty command line with the kernel's limit, [`CMDLINE_MAX_SIZE`].
    fn default() -> Self {
        Self {
            line: String::new(),
            capacity: CMDLINE_MAX_SIZE,
        }
    }
}

/// Writes `cmdline`, NUL-terminated, to guest memory at `addr`.
///
/// # Errors
///
/// [`CmdlineError::Memory`] with [`GuestWriteError::OutsideGuestMemory`] if it does
/// not fit at `addr` (nothing is written), or with [`GuestWriteError::Write`].
///
/// # Example
///
/// ```
/// use ember_arch::layout::CMDLINE_START;
/// use ember_boot::cmdline::{load_cmdline, Cmdline};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// let mut cmdline = Cmdline::default();
/// cmdline.insert_str("quiet")?;
/// load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline)?;
/// let mut back = [0u8; 6];
/// mem.read_slice(&mut back, GuestAddress(CMDLINE_START)).unwrap();
/// assert_eq!(&back, b"quiet\0");
/// # Ok::<(), ember_boot::cmdline::CmdlineError>(())
/// ```
pub fn load_cmdline<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    cmdline: &Cmdline,
) -> Result<(), CmdlineError> {
    write_bytes(mem, "command line", &cmdline.as_cstring_bytes(), addr.0)?;
    Ok(())
}

impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_with_single_space() {
        let mut c = Cmdline::new(64).unwrap();
        assert!(c.is_empty());
        c.insert_str("console=ttyS0").unwrap();
        c.insert_str("").unwrap();
        c.insert_str("reboot=k").unwrap();
        assert_eq!(c.as_str(), "console=ttyS0 reboot=k");
        assert_eq!(c.len(), 22);
        assert_eq!(c.as_cstring_bytes(), b"console=ttyS0 reboot=k\0");
        assert_eq!(c.to_string(), "console=ttyS0 reboot=k");
    }

    #[test]
    fn empty_line_is_just_nul() {
        let c = Cmdline::new(1).unwrap();
        assert_eq!(c.as_cstring_bytes(), b"\0");
        assert_eq!(Cmdline::default().capacity(), CMDLINE_MAX_SIZE);
    }

    #[test]
    fn zero_capacity_rejected() {
        assert!(matches!(Cmdline::new(0), Err(CmdlineError::ZeroCapacity)));
    }

    #[test]
    fn exact_fit_accepted_one_more_rejected() {
        // "abc def" + NUL = 8 bytes.
        let mut c = Cmdline::new(8).unwrap();
        c.insert_str("abc").unwrap();
        c.insert_str("def").unwrap();
        let err = c.insert_str("g").unwrap_err();
        assert!(matches!(err, CmdlineError::TooLong { len: 10, limit: 8 }));
        assert!(err.to_string().contains("10 bytes"));
        assert!(err.to_string().contains("limit of 8"));
        // Unchanged after the error.
        assert_eq!(c.as_str(), "abc def");
    }

    #[test]
    fn too_long_first_insert() {
        let mut c = Cmdline::new(4).unwrap();
        assert!(matches!(
            c.insert_str("abcd"),
            Err(CmdlineError::TooLong { len: 5, limit: 4 })
        ));
        assert!(c.is_empty());
    }

    #[test]
    fn nul_rejected() {
        let mut c = Cmdline::new(64).unwrap();
        assert!(matches!(
            c.insert_str("ab\0cd"),
            Err(CmdlineError::ContainsNul { position: 2 })
        ));
        assert!(c.is_empty());
    }

    #[test]
    fn non_printable_rejected() {
        let mut c = Cmdline::new(64).unwrap();
        for (s, byte, position) in [
            ("a\nb", b'\n', 1),
            ("\tx", b'\t', 0),
            ("x\x7f", 0x7f, 1),
            ("é", 0xc3, 0),
        ] {
            match c.insert_str(s) {
                Err(CmdlineError::NonPrintable {
                    byte: b,
                    position: p,
                }) => {
                    assert_eq!((b, p), (byte, position), "{s:?}");
                }
                other => panic!("{s:?}: unexpected {other:?}"),
            }
        }
        assert!(c.is_empty());
    }
}
