//! ACPI Machine Language (AML): the [`Aml`] trait a device implements to describe
//! itself in the DSDT, and the building blocks to write that description with.
//!
//! A description is a tree of AML objects: a [`Device`] holding [`Name`]s (`_HID`,
//! `_UID`, `_CRS`) whose values are integers, strings, [`EisaId`]s, [`Package`]s or
//! a [`ResourceTemplate`] of resource descriptors ([`Io`], [`Memory32Fixed`],
//! [`Interrupt`]). Each building block implements [`Aml`] too, so a device's
//! `append_aml_bytes` builds its tree and appends it:
//!
//! ```
//! use ember_firmware::aml::{Aml, Device, EisaId, Interrupt, Io, Name, NameSeg, ResourceTemplate};
//!
//! /// A second 16550, at COM2's port and IRQ.
//! struct Com2;
//!
//! impl Aml for Com2 {
//!     fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
//!         const NAME: NameSeg = match NameSeg::new(b"COM2") {
//!             Ok(name) => name,
//!             Err(_) => panic!("not a NameSeg"),
//!         };
//!         const HID: EisaId = match EisaId::new(b"PNP0501") {
//!             Ok(id) => id,
//!             Err(_) => panic!("not an EISA ID"),
//!         };
//!         let io = Io::new(0x2f8, 0x2f8, 1, 8);
//!         let irq = Interrupt::new(3);
//!         Device::new(
//!             NAME,
//!             &[
//!                 &Name::new(NameSeg::HID, &HID),
//!                 &Name::new(NameSeg::UID, &1u8),
//!                 &Name::new(NameSeg::CRS, &ResourceTemplate::new(&[&io, &irq])),
//!             ],
//!         )
//!         .append_aml_bytes(bytes);
//!     }
//! }
//!
//! let aml = Com2.to_aml_bytes();
//! // ExtOpPrefix DeviceOp, PkgLength, "COM2", then the names.
//! assert_eq!(&aml[..7], b"\x5b\x82\x31COM2");
//! ```
//!
//! The encodings follow the ACPI specification (6.4), chapter 20 ("ACPI Machine
//! Language (AML) Specification") for the terms and chapter 6.4 ("Resource Data Types
//! for ACPI") for the resource descriptors. Every block produces the exact bytes
//! `iasl` emits for the matching ASL when its name-path optimization is off (`-oa`;
//! the optimization shortens `\_SB` to `_SB`, which means the same at the root).
//!
//! A package length cannot exceed 2^28 - 1 bytes; a longer package would be encoded
//! with a wrong length. Nothing that large can reach a guest:
//! [`setup_acpi`](crate::acpi::setup_acpi) rejects a DSDT that does not fit in the
//! 124 KiB reserved for it.

/// An object that can write itself as AML: a device describing itself in the DSDT,
/// or any of the building blocks in this module.
pub trait Aml {
    /// Appends the object's AML encoding to `bytes`.
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>);

    /// The object's AML encoding.
    fn to_aml_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.append_aml_bytes(&mut bytes);
        bytes
    }
}

impl<T: Aml + ?Sized> Aml for &T {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        (**self).append_aml_bytes(bytes);
    }
}

/// Why an AML building block could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmlError {
    /// A name segment is not a leading `A`-`Z` or `_` followed by three `A`-`Z`,
    /// `0`-`9` or `_`.
    #[error("{name:02x?} is not an AML name segment (A-Z or _, then A-Z, 0-9 or _)")]
    InvalidNameSeg {
        /// The four bytes given.
        name: [u8; 4],
    },
    /// An EISA ID is not three upper-case letters followed by four hex digits.
    #[error("{id:02x?} is not an EISA ID (three letters A-Z, then four hex digits)")]
    InvalidEisaId {
        /// The seven bytes given.
        id: [u8; 7],
    },
    /// A name path has more segments than its one-byte count can say.
    #[error("a name path of {count} segments exceeds the limit of {max}")]
    TooManyPathSegments {
        /// The number of segments given.
        count: usize,
        /// The limit, 255.
        max: usize,
    },
}

/// `ZeroOp`: the integer 0.
const ZERO_OP: u8 = 0x00;
/// `OneOp`: the integer 1.
const ONE_OP: u8 = 0x01;
/// `NameOp`: `Name(NameString, DataRefObject)`.
const NAME_OP: u8 = 0x08;
/// `BytePrefix`: an 8-bit integer follows.
const BYTE_PREFIX: u8 = 0x0a;
/// `WordPrefix`: a 16-bit integer follows.
const WORD_PREFIX: u8 = 0x0b;
/// `DWordPrefix`: a 32-bit integer follows.
const DWORD_PREFIX: u8 = 0x0c;
/// `StringPrefix`: an ASCII string and a NUL follow.
const STRING_PREFIX: u8 = 0x0d;
/// `QWordPrefix`: a 64-bit integer follows.
const QWORD_PREFIX: u8 = 0x0e;
/// `ScopeOp`.
const SCOPE_OP: u8 = 0x10;
/// `BufferOp`.
const BUFFER_OP: u8 = 0x11;
/// `PackageOp`: at most 255 elements.
const PACKAGE_OP: u8 = 0x12;
/// `VarPackageOp`: any number of elements, counted by an integer term.
const VAR_PACKAGE_OP: u8 = 0x13;
/// `DualNamePrefix`: two name segments follow.
const DUAL_NAME_PREFIX: u8 = 0x2e;
/// `MultiNamePrefix`: a segment count and that many name segments follow.
const MULTI_NAME_PREFIX: u8 = 0x2f;
/// `ExtOpPrefix`, before `DeviceOp`.
const EXT_OP_PREFIX: u8 = 0x5b;
/// `DeviceOp` (after `ExtOpPrefix`).
const DEVICE_OP: u8 = 0x82;
/// `RootChar`: `\`, a name path from the namespace root.
const ROOT_CHAR: u8 = 0x5c;
/// `NullName`: a name path with no segments.
const NULL_NAME: u8 = 0x00;

/// Largest value of a one-byte PkgLength (6 bits).
const PKG_LENGTH_1_MAX: usize = 0x3f;
/// Largest value of a two-byte PkgLength (4 + 8 bits).
const PKG_LENGTH_2_MAX: usize = 0xfff;
/// Largest value of a three-byte PkgLength (4 + 16 bits).
const PKG_LENGTH_3_MAX: usize = 0xf_ffff;
/// Largest value of a four-byte PkgLength (4 + 24 bits).
const PKG_LENGTH_4_MAX: usize = 0xfff_ffff;

/// Small resource item "End Tag" (name 0xf, length 1): `0x79`.
const END_TAG: u8 = 0x79;
/// Small resource item "I/O Port Descriptor" (name 0x8, length 7): `0x47`.
const IO_DESCRIPTOR: u8 = 0x47;
/// Large resource item "32-Bit Fixed Memory Range Descriptor".
const MEMORY32_FIXED_DESCRIPTOR: u8 = 0x86;
/// Large resource item "Extended Interrupt Descriptor".
const EXTENDED_INTERRUPT_DESCRIPTOR: u8 = 0x89;

/// A 4-character AML name segment (`NameSeg`): a leading `A`-`Z` or `_`, then
/// `A`-`Z`, `0`-`9` or `_` (shorter ASL names are padded with `_`).
///
/// ```
/// use ember_firmware::aml::{Aml, NameSeg};
///
/// let name = NameSeg::new(b"COM1")?;
/// assert_eq!(name.to_aml_bytes(), b"COM1");
/// assert!(NameSeg::new(b"1ABC").is_err());
/// # Ok::<(), ember_firmware::aml::AmlError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NameSeg([u8; 4]);

impl NameSeg {
    /// `_HID`: a device's hardware ID.
    pub const HID: NameSeg = NameSeg(*b"_HID");
    /// `_UID`: a device's unique ID among devices with the same `_HID`.
    pub const UID: NameSeg = NameSeg(*b"_UID");
    /// `_CRS`: a device's current resources.
    pub const CRS: NameSeg = NameSeg(*b"_CRS");
    /// `_SB_`: the system bus, the scope devices live in.
    pub const SB: NameSeg = NameSeg(*b"_SB_");
    /// `_S5_`: the soft-off sleep state's sleep types.
    pub const S5: NameSeg = NameSeg(*b"_S5_");

    /// `name` as a name segment.
    ///
    /// # Errors
    ///
    /// [`AmlError::InvalidNameSeg`] if it is not one.
    pub const fn new(name: &[u8; 4]) -> Result<Self, AmlError> {
        const fn lead_ok(c: u8) -> bool {
            c.is_ascii_uppercase() || c == b'_'
        }
        const fn rest_ok(c: u8) -> bool {
            lead_ok(c) || c.is_ascii_digit()
        }
        let [a, b, c, d] = *name;
        if lead_ok(a) && rest_ok(b) && rest_ok(c) && rest_ok(d) {
            Ok(Self(*name))
        } else {
            Err(AmlError::InvalidNameSeg { name: *name })
        }
    }

    /// The four characters.
    pub const fn as_bytes(&self) -> &[u8; 4] {
        &self.0
    }
}

impl Aml for NameSeg {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(&self.0);
    }
}

/// A name path (`NameString`): name segments, from the namespace root (`\_SB_.PCI0`)
/// or relative to the enclosing scope.
///
/// ```
/// use ember_firmware::aml::{Aml, NamePath, NameSeg};
///
/// let sb = NamePath::root(&[NameSeg::SB])?;
/// assert_eq!(sb.to_aml_bytes(), b"\\_SB_");
/// # Ok::<(), ember_firmware::aml::AmlError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamePath {
    /// The encoded `NameString`.
    encoded: Vec<u8>,
}

impl NamePath {
    /// The most segments a path can have: `MultiNamePrefix` counts them in a byte.
    pub const MAX_SEGMENTS: usize = 255;

    /// The path `\seg.seg...` from the namespace root.
    ///
    /// # Errors
    ///
    /// [`AmlError::TooManyPathSegments`] for more than [`Self::MAX_SEGMENTS`].
    pub fn root(segments: &[NameSeg]) -> Result<Self, AmlError> {
        Self::encode(true, segments)
    }

    /// The path `\segment`: one segment from the namespace root (`\_SB_`).
    pub fn root_segment(segment: NameSeg) -> Self {
        let mut encoded = vec![ROOT_CHAR];
        encoded.extend_from_slice(segment.as_bytes());
        Self { encoded }
    }

    /// The path `seg.seg...`, relative to the scope it appears in (an empty path is
    /// `NullName`).
    ///
    /// # Errors
    ///
    /// [`AmlError::TooManyPathSegments`] for more than [`Self::MAX_SEGMENTS`].
    pub fn relative(segments: &[NameSeg]) -> Result<Self, AmlError> {
        Self::encode(false, segments)
    }

    fn encode(root: bool, segments: &[NameSeg]) -> Result<Self, AmlError> {
        let count = u8::try_from(segments.len()).map_err(|_| AmlError::TooManyPathSegments {
            count: segments.len(),
            max: Self::MAX_SEGMENTS,
        })?;
        let mut encoded = Vec::with_capacity(3 + 4 * segments.len());
        if root {
            encoded.push(ROOT_CHAR);
        }
        match count {
            0 => encoded.push(NULL_NAME),
            1 => {}
            2 => encoded.push(DUAL_NAME_PREFIX),
            n => encoded.extend_from_slice(&[MULTI_NAME_PREFIX, n]),
        }
        for segment in segments {
            encoded.extend_from_slice(segment.as_bytes());
        }
        Ok(Self { encoded })
    }
}

impl Aml for NamePath {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(&self.encoded);
    }
}

/// Appends `len`, the length of a package counting the PkgLength bytes themselves,
/// in the smallest PkgLength form:
///
/// - one byte for up to 63: bits 0-5 hold the length;
/// - two to four bytes above: bits 6-7 of the lead byte count the bytes that
///   follow (1-3), its bits 0-3 hold the low nibble of the length, and the
///   following bytes hold the rest, least significant first (bits 4-5 of the
///   lead byte stay 0).
///
/// Lengths above 2^28 - 1 cannot be expressed; see the module documentation for
/// why they never reach a guest.
fn append_pkg_length(bytes: &mut Vec<u8>, len: usize) {
    if len <= PKG_LENGTH_1_MAX {
        bytes.push(len as u8);
        return;
    }
    let follow: u8 = if len <= PKG_LENGTH_2_MAX {
        1
    } else if len <= PKG_LENGTH_3_MAX {
        2
    } else {
        3
    };
    let len = len.min(PKG_LENGTH_4_MAX);
    bytes.push((follow << 6) | (len & 0xf) as u8);
    bytes.extend((0..follow).map(|i| (len >> (4 + 8 * i)) as u8));
}

/// Appends `op`, then `body` prefixed with the PkgLength of the whole package: the
/// length counts the PkgLength bytes themselves, so the form is chosen for
/// `body.len()` plus its own size.
fn append_package(bytes: &mut Vec<u8>, op: &[u8], body: &[u8]) {
    let n = body.len();
    let total = if n < PKG_LENGTH_1_MAX {
        n + 1
    } else if n + 2 <= PKG_LENGTH_2_MAX {
        n + 2
    } else if n + 3 <= PKG_LENGTH_3_MAX {
        n + 3
    } else {
        n.saturating_add(4)
    };
    bytes.extend_from_slice(op);
    append_pkg_length(bytes, total);
    bytes.extend_from_slice(body);
}

/// Appends every child's encoding to a fresh body.
fn body_of(children: &[&dyn Aml]) -> Vec<u8> {
    let mut body = Vec::new();
    for child in children {
        child.append_aml_bytes(&mut body);
    }
    body
}

/// An integer in its shortest encoding: `ZeroOp`, `OneOp`, or the smallest of
/// `BytePrefix`, `WordPrefix`, `DWordPrefix` and `QWordPrefix` that holds it
/// (little-endian). `OnesOp` is never used: it means all ones, whose width depends
/// on the DSDT revision.
fn append_integer(bytes: &mut Vec<u8>, value: u64) {
    match value {
        0 => bytes.push(ZERO_OP),
        1 => bytes.push(ONE_OP),
        v => {
            let (prefix, width) = if v <= 0xff {
                (BYTE_PREFIX, 1)
            } else if v <= 0xffff {
                (WORD_PREFIX, 2)
            } else if v <= 0xffff_ffff {
                (DWORD_PREFIX, 4)
            } else {
                (QWORD_PREFIX, 8)
            };
            bytes.push(prefix);
            bytes.extend_from_slice(v.to_le_bytes().get(..width).unwrap_or_default());
        }
    }
}

/// An integer, in the shortest encoding that holds its value (so `0x10u64` and
/// `0x10u8` encode alike).
impl Aml for u8 {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        append_integer(bytes, u64::from(*self));
    }
}

/// An integer, in the shortest encoding that holds its value.
impl Aml for u16 {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        append_integer(bytes, u64::from(*self));
    }
}

/// An integer, in the shortest encoding that holds its value.
impl Aml for u32 {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        append_integer(bytes, u64::from(*self));
    }
}

/// An integer, in the shortest encoding that holds its value.
impl Aml for u64 {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        append_integer(bytes, *self);
    }
}

/// A string constant: `StringPrefix`, the characters, `NullChar`.
///
/// AML strings are ASCII (`0x01`-`0x7f`): pass such text, such as `"LNRO0005"`. A NUL
/// inside would end the string early for the guest.
impl Aml for str {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        bytes.push(STRING_PREFIX);
        bytes.extend_from_slice(self.as_bytes());
        bytes.push(0);
    }
}

/// A 7-character EISA ID (`"PNP0501"`: three upper-case letters and four hex
/// digits), compressed to the 32-bit integer ASL's `EISAID()` produces.
///
/// Each letter becomes 5 bits (`'A'` is 1) and each hex digit 4 bits; the 32 bits,
/// letters first from the top, are then stored big-endian, so the integer is the
/// byte-swapped value: `"PNP0501"` packs to `0x41d0_0501` and compresses to
/// `0x0105_d041`.
///
/// ```
/// use ember_firmware::aml::EisaId;
///
/// assert_eq!(EisaId::new(b"PNP0501")?.value(), 0x0105_d041);
/// assert!(EisaId::new(b"pnp0501").is_err());
/// # Ok::<(), ember_firmware::aml::AmlError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EisaId(u32);

impl EisaId {
    /// Compresses `id`.
    ///
    /// # Errors
    ///
    /// [`AmlError::InvalidEisaId`] if it is not three letters `A`-`Z` and four hex
    /// digits (either case).
    pub const fn new(id: &[u8; 7]) -> Result<Self, AmlError> {
        const fn hex(c: u8) -> Option<u32> {
            match c {
                b'0'..=b'9' => Some((c - b'0') as u32),
                b'A'..=b'F' => Some((c - b'A' + 10) as u32),
                b'a'..=b'f' => Some((c - b'a' + 10) as u32),
                _ => None,
            }
        }
        const fn letter(c: u8) -> Option<u32> {
            if c.is_ascii_uppercase() {
                Some((c - 0x40) as u32)
            } else {
                None
            }
        }
        let [l0, l1, l2, h0, h1, h2, h3] = *id;
        let (Some(l0), Some(l1), Some(l2)) = (letter(l0), letter(l1), letter(l2)) else {
            return Err(AmlError::InvalidEisaId { id: *id });
        };
        let (Some(h0), Some(h1), Some(h2), Some(h3)) = (hex(h0), hex(h1), hex(h2), hex(h3)) else {
            return Err(AmlError::InvalidEisaId { id: *id });
        };
        let packed = (l0 << 26) | (l1 << 21) | (l2 << 16) | (h0 << 12) | (h1 << 8) | (h2 << 4) | h3;
        Ok(Self(packed.swap_bytes()))
    }

    /// The compressed value, as the guest reads the integer.
    pub const fn value(&self) -> u32 {
        self.0
    }
}

/// The compressed ID as an integer (as `iasl` writes `EISAID()`).
impl Aml for EisaId {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        append_integer(bytes, u64::from(self.0));
    }
}

/// `Name(name, value)`: `NameOp`, the name segment, the data object.
pub struct Name<'a> {
    name: NameSeg,
    value: &'a dyn Aml,
}

impl<'a> Name<'a> {
    /// Names `value` (an integer, a string, an [`EisaId`], a [`Package`], a
    /// [`ResourceTemplate`], ...) `name` in the enclosing scope.
    pub fn new(name: NameSeg, value: &'a dyn Aml) -> Self {
        Self { name, value }
    }
}

impl Aml for Name<'_> {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        bytes.push(NAME_OP);
        self.name.append_aml_bytes(bytes);
        self.value.append_aml_bytes(bytes);
    }
}

/// `Scope(path) { children }`: `ScopeOp`, PkgLength, the name path, the terms.
pub struct Scope<'a> {
    path: NamePath,
    children: &'a [&'a dyn Aml],
}

impl<'a> Scope<'a> {
    /// Opens the existing scope `path` and declares `children` in it.
    pub fn new(path: NamePath, children: &'a [&'a dyn Aml]) -> Self {
        Self { path, children }
    }
}

impl Aml for Scope<'_> {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        let mut body = self.path.to_aml_bytes();
        for child in self.children {
            child.append_aml_bytes(&mut body);
        }
        append_package(bytes, &[SCOPE_OP], &body);
    }
}

/// `Device(name) { children }`: `ExtOpPrefix DeviceOp`, PkgLength, the name
/// segment, the terms (usually [`Name`]s: `_HID`, `_UID`, `_CRS`).
pub struct Device<'a> {
    name: NameSeg,
    children: &'a [&'a dyn Aml],
}

impl<'a> Device<'a> {
    /// Declares device `name` with `children` in its scope.
    pub fn new(name: NameSeg, children: &'a [&'a dyn Aml]) -> Self {
        Self { name, children }
    }
}

impl Aml for Device<'_> {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        let mut body = self.name.to_aml_bytes();
        for child in self.children {
            child.append_aml_bytes(&mut body);
        }
        append_package(bytes, &[EXT_OP_PREFIX, DEVICE_OP], &body);
    }
}

/// `Package() { elements }`: `PackageOp`, PkgLength, `NumElements` (one byte), the
/// elements. With more than 255 elements, `VarPackageOp` and `NumElements` as an
/// integer, as `iasl` does.
pub struct Package<'a> {
    elements: &'a [&'a dyn Aml],
}

impl<'a> Package<'a> {
    /// A package of `elements`, in order.
    pub fn new(elements: &'a [&'a dyn Aml]) -> Self {
        Self { elements }
    }
}

impl Aml for Package<'_> {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        let (op, mut body) = match u8::try_from(self.elements.len()) {
            Ok(count) => (PACKAGE_OP, vec![count]),
            Err(_) => {
                let mut count = Vec::new();
                append_integer(&mut count, self.elements.len() as u64);
                (VAR_PACKAGE_OP, count)
            }
        };
        body.extend(body_of(self.elements));
        append_package(bytes, &[op], &body);
    }
}

/// `Buffer(n) { bytes }` with `n` the number of bytes: `BufferOp`, PkgLength, the
/// size as an integer, the bytes.
pub struct Buffer<'a> {
    data: &'a [u8],
}

impl<'a> Buffer<'a> {
    /// A buffer holding `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
}

impl Aml for Buffer<'_> {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        append_buffer(bytes, self.data);
    }
}

fn append_buffer(bytes: &mut Vec<u8>, data: &[u8]) {
    let mut body = Vec::with_capacity(data.len() + 9);
    append_integer(&mut body, data.len() as u64);
    body.extend_from_slice(data);
    append_package(bytes, &[BUFFER_OP], &body);
}

/// `ResourceTemplate() { descriptors }`, the value of a `_CRS`: a buffer holding
/// the resource descriptors followed by an End Tag whose checksum byte is 0 ("the
/// checksum is treated as valid").
pub struct ResourceTemplate<'a> {
    descriptors: &'a [&'a dyn Aml],
}

impl<'a> ResourceTemplate<'a> {
    /// A template of `descriptors` ([`Io`], [`Memory32Fixed`], [`Interrupt`], ...),
    /// in order.
    pub fn new(descriptors: &'a [&'a dyn Aml]) -> Self {
        Self { descriptors }
    }
}

impl Aml for ResourceTemplate<'_> {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        let mut data = body_of(self.descriptors);
        data.extend_from_slice(&[END_TAG, 0]);
        append_buffer(bytes, &data);
    }
}

/// `IO(Decode16, min, max, alignment, length)`: the 8-byte I/O port descriptor
/// (`0x47`, information byte bit 0 = 16-bit decode), for a `_CRS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    min: u16,
    max: u16,
    alignment: u8,
    length: u8,
}

impl Io {
    /// `length` ports, based anywhere from `min` to `max` in steps of `alignment`
    /// (a fixed range has `min == max`).
    pub const fn new(min: u16, max: u16, alignment: u8, length: u8) -> Self {
        Self {
            min,
            max,
            alignment,
            length,
        }
    }
}

impl Aml for Io {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(&[IO_DESCRIPTOR, 1]);
        bytes.extend_from_slice(&self.min.to_le_bytes());
        bytes.extend_from_slice(&self.max.to_le_bytes());
        bytes.extend_from_slice(&[self.alignment, self.length]);
    }
}

/// `Memory32Fixed(ReadWrite or ReadOnly, base, length)`: the 12-byte 32-bit fixed
/// memory range descriptor (`0x86`, length 9, information byte bit 0 = writable),
/// for a `_CRS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory32Fixed {
    base: u32,
    length: u32,
    writable: bool,
}

impl Memory32Fixed {
    /// `length` bytes at `base`, writable (`ReadWrite`) or not (`ReadOnly`).
    pub const fn new(base: u32, length: u32, writable: bool) -> Self {
        Self {
            base,
            length,
            writable,
        }
    }
}

impl Aml for Memory32Fixed {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(&[MEMORY32_FIXED_DESCRIPTOR, 9, 0, u8::from(self.writable)]);
        bytes.extend_from_slice(&self.base.to_le_bytes());
        bytes.extend_from_slice(&self.length.to_le_bytes());
    }
}

/// `Interrupt(ResourceConsumer, trigger, polarity, sharing) { gsi }`: the 9-byte
/// extended interrupt descriptor (`0x89`, length 6; one interrupt number, no
/// resource source), for a `_CRS`.
///
/// [`Interrupt::new`] is edge-triggered, active high and exclusive, which is how
/// interrupts behave when a VMM raises them through KVM irqfds: they pulse the
/// IOAPIC pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupt {
    gsi: u32,
    flags: u8,
}

impl Interrupt {
    /// Flag bit 0: the device consumes the interrupt.
    const CONSUMER: u8 = 1 << 0;
    /// Flag bit 1: edge-triggered (clear: level-triggered).
    const EDGE: u8 = 1 << 1;
    /// Flag bit 2: active low (clear: active high).
    const ACTIVE_LOW: u8 = 1 << 2;
    /// Flag bit 3: shared (clear: exclusive).
    const SHARED: u8 = 1 << 3;

    /// `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`.
    pub const fn new(gsi: u32) -> Self {
        Self {
            gsi,
            flags: Self::CONSUMER | Self::EDGE,
        }
    }

    /// The same interrupt, level-triggered.
    pub const fn level_triggered(self) -> Self {
        Self {
            flags: self.flags & !Self::EDGE,
            ..self
        }
    }

    /// The same interrupt, active low.
    pub const fn active_low(self) -> Self {
        Self {
            flags: self.flags | Self::ACTIVE_LOW,
            ..self
        }
    }

    /// The same interrupt, shared with other devices.
    pub const fn shared(self) -> Self {
        Self {
            flags: self.flags | Self::SHARED,
            ..self
        }
    }
}

impl Aml for Interrupt {
    fn append_aml_bytes(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(&[EXTENDED_INTERRUPT_DESCRIPTOR, 6, 0, self.flags, 1]);
        bytes.extend_from_slice(&self.gsi.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a PkgLength at the start of `b`: (value, bytes used).
    fn decode_pkg_length(b: &[u8]) -> (usize, usize) {
        let follow = usize::from(b[0] >> 6);
        if follow == 0 {
            return (usize::from(b[0] & 0x3f), 1);
        }
        assert_eq!(b[0] & 0x30, 0, "reserved bits");
        let mut len = usize::from(b[0] & 0xf);
        for i in 0..follow {
            len |= usize::from(b[1 + i]) << (4 + 8 * i);
        }
        (len, 1 + follow)
    }

    fn pkg_length(len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        append_pkg_length(&mut out, len);
        out
    }

    fn package(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        append_package(&mut out, &[], body);
        out
    }

    fn seg(name: &[u8; 4]) -> NameSeg {
        NameSeg::new(name).unwrap()
    }

    #[test]
    fn pkg_length_forms_and_boundaries() {
        assert_eq!(pkg_length(0), [0x00]);
        assert_eq!(pkg_length(63), [0x3f]);
        // 64 = 0x040: lead 0x40 (one byte follows, low nibble 0), then 0x04.
        assert_eq!(pkg_length(64), [0x40, 0x04]);
        assert_eq!(pkg_length(0x123), [0x43, 0x12]);
        assert_eq!(pkg_length(4095), [0x4f, 0xff]);
        // 4096 = 0x1000: lead 0x80 (two bytes follow), then 0x00, 0x01.
        assert_eq!(pkg_length(4096), [0x80, 0x00, 0x01]);
        assert_eq!(pkg_length(0xf_ffff), [0x8f, 0xff, 0xff]);
        assert_eq!(pkg_length(0x10_0000), [0xc0, 0x00, 0x00, 0x01]);
        assert_eq!(pkg_length(0xfff_ffff), [0xcf, 0xff, 0xff, 0xff]);
        for len in [
            0, 1, 63, 64, 65, 4094, 4095, 4096, 4097, 0xf_ffff, 0x10_0000,
        ] {
            assert_eq!(
                decode_pkg_length(&pkg_length(len)),
                (len, pkg_length(len).len())
            );
        }
    }

    #[test]
    fn package_length_counts_itself() {
        // (body length, PkgLength bytes, encoded total)
        let cases = [
            (0, 1, 1),
            (62, 1, 63),
            // 63 + 1 = 64 does not fit one byte: two bytes, total 65.
            (63, 2, 65),
            (4093, 2, 4095),
            // 4094 + 2 = 4096 does not fit two bytes: three, total 4097.
            (4094, 3, 4097),
            (0xf_fffc, 3, 0xf_ffff),
            (0xf_fffd, 4, 0x10_0001),
        ];
        for (n, k, total) in cases {
            let p = package(&vec![0xaa; n]);
            assert_eq!(p.len(), n + k, "body {n}");
            assert_eq!(decode_pkg_length(&p), (total, k), "body {n}");
            assert_eq!(total, n + k);
        }
    }

    #[test]
    fn integers_use_the_smallest_prefix() {
        assert_eq!(0u64.to_aml_bytes(), [0x00]);
        assert_eq!(1u64.to_aml_bytes(), [0x01]);
        assert_eq!(2u64.to_aml_bytes(), [0x0a, 0x02]);
        assert_eq!(0xffu64.to_aml_bytes(), [0x0a, 0xff]);
        assert_eq!(0x100u64.to_aml_bytes(), [0x0b, 0x00, 0x01]);
        assert_eq!(0xffffu64.to_aml_bytes(), [0x0b, 0xff, 0xff]);
        assert_eq!(0x1_0000u64.to_aml_bytes(), [0x0c, 0x00, 0x00, 0x01, 0x00]);
        assert_eq!(
            0xffff_ffffu64.to_aml_bytes(),
            [0x0c, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            0x1_0000_0000u64.to_aml_bytes(),
            [0x0e, 0, 0, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(
            u64::MAX.to_aml_bytes(),
            [0x0e, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        // The width of the Rust type does not matter, only the value.
        assert_eq!(5u8.to_aml_bytes(), 5u64.to_aml_bytes());
        assert_eq!(0x300u16.to_aml_bytes(), 0x300u64.to_aml_bytes());
        assert_eq!(1u32.to_aml_bytes(), [0x01]);
    }

    #[test]
    fn eisa_id_compression() {
        assert_eq!(EisaId::new(b"PNP0501").unwrap().value(), 0x0105_d041);
        // PNP0A03 (PCI host bridge), as iasl compiles it: 41 d0 0a 03.
        let pci = EisaId::new(b"PNP0A03").unwrap();
        assert_eq!(pci.value().to_le_bytes(), [0x41, 0xd0, 0x0a, 0x03]);
        assert_eq!(EisaId::new(b"PNP0a03").unwrap(), pci);
        assert_eq!(pci.to_aml_bytes(), [0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        for bad in [b"pnp0501", b"PN00501", b"PNP050G", b"PNP 501"] {
            assert_eq!(EisaId::new(bad), Err(AmlError::InvalidEisaId { id: *bad }));
        }
    }

    #[test]
    fn strings_and_names() {
        assert_eq!("LNRO0005".to_aml_bytes(), b"\x0dLNRO0005\x00");
        assert_eq!(
            Name::new(NameSeg::UID, &7u8).to_aml_bytes(),
            [0x08, b'_', b'U', b'I', b'D', 0x0a, 7]
        );
        for good in [b"_SB_", b"COM1", b"V0FF", b"_S5_"] {
            assert_eq!(NameSeg::new(good).unwrap().as_bytes(), good);
        }
        for bad in [b"1ABC", b"ab__", b"A-B_", b"COM\0"] {
            assert_eq!(
                NameSeg::new(bad),
                Err(AmlError::InvalidNameSeg { name: *bad })
            );
        }
        for constant in [
            NameSeg::HID,
            NameSeg::UID,
            NameSeg::CRS,
            NameSeg::SB,
            NameSeg::S5,
        ] {
            assert_eq!(NameSeg::new(constant.as_bytes()), Ok(constant));
        }
    }

    #[test]
    fn name_paths() {
        let sb = NameSeg::SB;
        let pci = seg(b"PCI0");
        assert_eq!(NamePath::root(&[sb]).unwrap().to_aml_bytes(), b"\\_SB_");
        assert_eq!(NamePath::root_segment(sb), NamePath::root(&[sb]).unwrap());
        assert_eq!(NamePath::relative(&[pci]).unwrap().to_aml_bytes(), b"PCI0");
        assert_eq!(
            NamePath::root(&[sb, pci]).unwrap().to_aml_bytes(),
            b"\\\x2e_SB_PCI0"
        );
        assert_eq!(
            NamePath::relative(&[sb, pci, pci]).unwrap().to_aml_bytes(),
            b"\x2f\x03_SB_PCI0PCI0"
        );
        assert_eq!(NamePath::root(&[]).unwrap().to_aml_bytes(), b"\\\x00");
        assert!(NamePath::relative(&[pci; 255]).is_ok());
        assert_eq!(
            NamePath::relative(&[pci; 256]),
            Err(AmlError::TooManyPathSegments {
                count: 256,
                max: 255
            })
        );
    }

    #[test]
    fn packages_count_their_elements() {
        // Package () { 0x05, Zero }, as iasl compiles it: PackageOp,
        // PkgLength 5 (itself, NumElements, 0x0a 0x05, 0x00), 2 elements.
        assert_eq!(
            Package::new(&[&5u8, &0u8]).to_aml_bytes(),
            [0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]
        );
        assert_eq!(Package::new(&[]).to_aml_bytes(), [0x12, 0x02, 0x00]);
        // 255 OneOps: NumElements 255, a two-byte PkgLength: 255 + 1 + 2.
        let many: Vec<&dyn Aml> = vec![&1u8; 255];
        let p = Package::new(&many).to_aml_bytes();
        assert_eq!(&p[..4], [0x12, 0x42, 0x10, 0xff]);
        assert_eq!(p.len(), 1 + 2 + 1 + 255);
        assert_eq!(decode_pkg_length(&p[1..]), (258, 2));
        // 300: VarPackageOp, NumElements as a WordPrefix integer.
        let more: Vec<&dyn Aml> = vec![&1u8; 300];
        let p = Package::new(&more).to_aml_bytes();
        assert_eq!(p[0], 0x13);
        assert_eq!(decode_pkg_length(&p[1..]), (2 + 3 + 300, 2));
        assert_eq!(&p[3..6], [0x0b, 0x2c, 0x01]);
        assert_eq!(p.len(), 1 + 2 + 3 + 300);
    }

    #[test]
    fn resource_descriptors() {
        assert_eq!(
            Memory32Fixed::new(0xd000_0000, 0x1000, true).to_aml_bytes(),
            [0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00]
        );
        assert_eq!(
            Memory32Fixed::new(0xfed0_0000, 0x400, false).to_aml_bytes()[3],
            0x00
        );
        assert_eq!(
            Io::new(0x3f8, 0x3f8, 1, 8).to_aml_bytes(),
            [0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        );
        assert_eq!(
            Interrupt::new(4).to_aml_bytes(),
            [0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]
        );
        // Interrupt (ResourceConsumer, Level, ActiveLow, Shared) {0x17}: flags
        // consumer | active low | shared.
        assert_eq!(
            Interrupt::new(23)
                .level_triggered()
                .active_low()
                .shared()
                .to_aml_bytes(),
            [0x89, 0x06, 0x00, 0x0d, 0x01, 0x17, 0x00, 0x00, 0x00]
        );
        // Empty template: BufferOp, PkgLength 5 (itself + 4), size 2, End Tag.
        assert_eq!(
            ResourceTemplate::new(&[]).to_aml_bytes(),
            [0x11, 0x05, 0x0a, 0x02, 0x79, 0x00]
        );
    }

    #[test]
    fn scope_device_and_buffer_wrap_their_bodies() {
        let sb = NamePath::root(&[NameSeg::SB]).unwrap();
        assert_eq!(
            Scope::new(sb, &[]).to_aml_bytes(),
            [0x10, 0x06, 0x5c, b'_', b'S', b'B', b'_']
        );
        assert_eq!(
            Device::new(seg(b"ABCD"), &[&Name::new(seg(b"FOO_"), &0u8)]).to_aml_bytes(),
            [0x5b, 0x82, 0x0b, b'A', b'B', b'C', b'D', 0x08, b'F', b'O', b'O', b'_', 0x00]
        );
        // A 300-byte buffer: size needs a WordPrefix, the package two bytes.
        let b = Buffer::new(&[0; 300]).to_aml_bytes();
        // 3 + 300 + 2 = 305 = 0x131: lead 0x41, then 0x13.
        assert_eq!(&b[..6], [0x11, 0x41, 0x13, 0x0b, 0x2c, 0x01]);
        assert_eq!(b.len(), 1 + 2 + 3 + 300);
        assert_eq!(decode_pkg_length(&b[1..]), (305, 2));
    }

    #[test]
    fn references_and_trait_objects_encode_like_the_object() {
        let value = 0x1234u16;
        let by_ref: &dyn Aml = &&value;
        assert_eq!(by_ref.to_aml_bytes(), value.to_aml_bytes());
        let mut bytes = vec![0xee];
        "A".append_aml_bytes(&mut bytes);
        assert_eq!(bytes, [0xee, 0x0d, b'A', 0x00]);
    }
}
