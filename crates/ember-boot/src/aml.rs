//! A small encoder for ACPI Machine Language (AML): just what the DSDT that
//! [`setup_acpi`](crate::setup_acpi) writes needs.
//!
//! The encodings follow the ACPI specification (6.x), chapter 20 ("ACPI
//! Machine Language (AML) Specification") for the terms and chapter 6.4
//! ("Resource Data Types for ACPI") for the resource descriptors inside a
//! `ResourceTemplate`. Every function returns the exact bytes `iasl` emits
//! for the matching ASL when its name-path optimization is off (`-oa`; the
//! optimization shortens `\_SB` to `_SB`, which means the same at the root).
//!
//! A package length cannot exceed 2^28 - 1 bytes. Nothing built here comes
//! near that: `setup_acpi` bounds the device count before building the DSDT
//! and rejects a DSDT that does not fit in the 124 KiB reserved for it, so a
//! longer package (whose length this encoder could not express) never
//! reaches guest memory.

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
/// `PackageOp`.
const PACKAGE_OP: u8 = 0x12;
/// `ExtOpPrefix`, before `DeviceOp`.
const EXT_OP_PREFIX: u8 = 0x5b;
/// `DeviceOp` (after `ExtOpPrefix`).
const DEVICE_OP: u8 = 0x82;
/// `RootChar`: `\`, a name path from the namespace root.
pub(crate) const ROOT_CHAR: u8 = 0x5c;

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

/// A 4-character AML name segment (`NameSeg`): a leading `A`-`Z` or `_`,
/// then `A`-`Z`, `0`-`9` or `_`, padded with `_`.
pub(crate) type NameSeg = [u8; 4];

/// Whether `seg` is a valid `NameSeg`.
#[cfg(test)]
pub(crate) fn is_name_seg(seg: &NameSeg) -> bool {
    let lead_ok = |c: u8| c.is_ascii_uppercase() || c == b'_';
    seg.first().is_some_and(|&c| lead_ok(c))
        && seg.iter().all(|&c| lead_ok(c) || c.is_ascii_digit())
}

/// Encodes `len`, the length of a package counting the PkgLength bytes
/// themselves, in the smallest PkgLength form:
///
/// - one byte for up to 63: bits 0-5 hold the length;
/// - two to four bytes above: bits 6-7 of the lead byte count the bytes that
///   follow (1-3), its bits 0-3 hold the low nibble of the length, and the
///   following bytes hold the rest, least significant first (bits 4-5 of the
///   lead byte stay 0).
///
/// Lengths above 2^28 - 1 cannot be expressed; see the module
/// documentation for why they never occur.
pub(crate) fn pkg_length(len: usize) -> Vec<u8> {
    if len <= PKG_LENGTH_1_MAX {
        return vec![len as u8];
    }
    let follow: u8 = if len <= PKG_LENGTH_2_MAX {
        1
    } else if len <= PKG_LENGTH_3_MAX {
        2
    } else {
        3
    };
    let len = len.min(PKG_LENGTH_4_MAX);
    let mut out = vec![(follow << 6) | (len & 0xf) as u8];
    out.extend((0..follow).map(|i| (len >> (4 + 8 * i)) as u8));
    out
}

/// Prefixes `body` with the PkgLength of the whole package: the length
/// counts the PkgLength bytes themselves, so the form is chosen for
/// `body.len()` plus its own size.
pub(crate) fn package(body: &[u8]) -> Vec<u8> {
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
    let mut out = pkg_length(total);
    out.extend_from_slice(body);
    out
}

/// An integer in its shortest encoding: `ZeroOp`, `OneOp`, or the smallest
/// of `BytePrefix`, `WordPrefix`, `DWordPrefix` and `QWordPrefix` that holds
/// it (little-endian). `OnesOp` is never used: it means all ones, whose
/// width depends on the DSDT revision.
pub(crate) fn integer(value: u64) -> Vec<u8> {
    match value {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
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
            let mut out = vec![prefix];
            out.extend_from_slice(v.to_le_bytes().get(..width).unwrap_or_default());
            out
        }
    }
}

/// A string constant: `StringPrefix`, the ASCII characters, `NullChar`.
///
/// Callers pass ASCII constants without NULs (`"LNRO0005"`).
pub(crate) fn string(s: &str) -> Vec<u8> {
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    out
}

/// Compresses a 7-character EISA ID (`"PNP0501"`: three upper-case letters
/// and four hex digits) into the 32-bit integer ASL's `EISAID()` produces.
///
/// Each letter becomes 5 bits (`'A'` is 1) and each hex digit 4 bits; the
/// 32 bits, letters first from the top, are then stored big-endian, so the
/// integer is the byte-swapped value: `"PNP0501"` packs to `0x41d0_0501`
/// and compresses to `0x0105_d041`. Other characters give a meaningless
/// value; callers pass constants.
pub(crate) const fn eisa_id(id: &[u8; 7]) -> u32 {
    const fn hex(c: u8) -> u32 {
        (match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'F' => c - b'A' + 10,
            b'a'..=b'f' => c - b'a' + 10,
            _ => 0,
        }) as u32
    }
    const fn letter(c: u8) -> u32 {
        (c.wrapping_sub(0x40) & 0x1f) as u32
    }
    let packed = (letter(id[0]) << 26)
        | (letter(id[1]) << 21)
        | (letter(id[2]) << 16)
        | (hex(id[3]) << 12)
        | (hex(id[4]) << 8)
        | (hex(id[5]) << 4)
        | hex(id[6]);
    packed.swap_bytes()
}

/// `Name(seg, data)`: `NameOp`, the name segment, the data object.
pub(crate) fn name(seg: &NameSeg, data: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend_from_slice(seg);
    out.extend_from_slice(data);
    out
}

/// `Scope(path) { body }`: `ScopeOp`, PkgLength, the name path, the terms.
pub(crate) fn scope(path: &[u8], body: &[u8]) -> Vec<u8> {
    let mut inner = path.to_vec();
    inner.extend_from_slice(body);
    let mut out = vec![SCOPE_OP];
    out.extend(package(&inner));
    out
}

/// `Device(seg) { body }`: `ExtOpPrefix DeviceOp`, PkgLength, the name
/// segment, the terms.
pub(crate) fn device(seg: &NameSeg, body: &[u8]) -> Vec<u8> {
    let mut inner = seg.to_vec();
    inner.extend_from_slice(body);
    let mut out = vec![EXT_OP_PREFIX, DEVICE_OP];
    out.extend(package(&inner));
    out
}

/// `Buffer(n) { bytes }` with `n` the length of `bytes`: `BufferOp`,
/// PkgLength, the size as an integer, the bytes.
pub(crate) fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut inner = integer(bytes.len() as u64);
    inner.extend_from_slice(bytes);
    let mut out = vec![BUFFER_OP];
    out.extend(package(&inner));
    out
}

/// `Package() { elements }`: `PackageOp`, PkgLength, `NumElements` (one
/// byte), the elements, each already encoded (an [`integer`], say).
///
/// Callers pass a handful of elements; more than 255 would not fit
/// `NumElements` and are cut off there.
pub(crate) fn package_of(elements: &[&[u8]]) -> Vec<u8> {
    let count = elements.len().min(usize::from(u8::MAX));
    let mut inner = vec![count as u8];
    for element in elements.iter().take(count) {
        inner.extend_from_slice(element);
    }
    let mut out = vec![PACKAGE_OP];
    out.extend(package(&inner));
    out
}

/// `ResourceTemplate() { descriptors }`: a buffer holding the descriptors
/// followed by an End Tag whose checksum byte is 0 ("the checksum is
/// treated as valid").
pub(crate) fn resource_template(descriptors: &[u8]) -> Vec<u8> {
    let mut bytes = descriptors.to_vec();
    bytes.extend_from_slice(&[END_TAG, 0]);
    buffer(&bytes)
}

/// `Memory32Fixed(ReadWrite, base, len)`: the 12-byte 32-bit fixed memory
/// range descriptor (`0x86`, length 9, information byte bit 0 = writable).
pub(crate) fn memory32_fixed(base: u32, len: u32) -> [u8; 12] {
    let mut d = [0u8; 12];
    crate::le::put(&mut d, 0, &[MEMORY32_FIXED_DESCRIPTOR, 9, 0, 1]);
    crate::le::put(&mut d, 4, &base.to_le_bytes());
    crate::le::put(&mut d, 8, &len.to_le_bytes());
    d
}

/// `IO(Decode16, min, max, align, len)`: the 8-byte I/O port descriptor
/// (`0x47`, information byte bit 0 = 16-bit decode).
pub(crate) fn io(min: u16, max: u16, align: u8, len: u8) -> [u8; 8] {
    let mut d = [0u8; 8];
    crate::le::put(&mut d, 0, &[IO_DESCRIPTOR, 1]);
    crate::le::put(&mut d, 2, &min.to_le_bytes());
    crate::le::put(&mut d, 4, &max.to_le_bytes());
    crate::le::put(&mut d, 6, &[align, len]);
    d
}

/// `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`: the
/// 9-byte extended interrupt descriptor (`0x89`, length 6; flags bit 0 =
/// consumer, bit 1 = edge, bit 2 = 0 active high, bit 3 = 0 exclusive,
/// bit 4 = 0 not wake capable; one interrupt number; no resource source).
///
/// Edge and active high is how Ember's interrupts behave: KVM irqfds
/// pulse the IOAPIC pin, and the MP table describes the ISA IRQs the same
/// way (conforming to the ISA bus).
pub(crate) fn extended_interrupt(gsi: u32) -> [u8; 9] {
    const CONSUMER: u8 = 1 << 0;
    const EDGE: u8 = 1 << 1;
    let mut d = [0u8; 9];
    crate::le::put(&mut d, 0, &[EXTENDED_INTERRUPT_DESCRIPTOR, 6, 0]);
    crate::le::put(&mut d, 3, &[CONSUMER | EDGE, 1]);
    crate::le::put(&mut d, 5, &gsi.to_le_bytes());
    d
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
        assert_eq!(integer(0), [0x00]);
        assert_eq!(integer(1), [0x01]);
        assert_eq!(integer(2), [0x0a, 0x02]);
        assert_eq!(integer(0xff), [0x0a, 0xff]);
        assert_eq!(integer(0x100), [0x0b, 0x00, 0x01]);
        assert_eq!(integer(0xffff), [0x0b, 0xff, 0xff]);
        assert_eq!(integer(0x1_0000), [0x0c, 0x00, 0x00, 0x01, 0x00]);
        assert_eq!(integer(0xffff_ffff), [0x0c, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(integer(0x1_0000_0000), [0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(
            integer(u64::MAX),
            [0x0e, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn eisa_id_compression() {
        assert_eq!(eisa_id(b"PNP0501"), 0x0105_d041);
        // PNP0A03 (PCI host bridge), as iasl compiles it: 41 d0 0a 03.
        assert_eq!(eisa_id(b"PNP0A03").to_le_bytes(), [0x41, 0xd0, 0x0a, 0x03]);
        assert_eq!(eisa_id(b"PNP0a03"), eisa_id(b"PNP0A03"));
    }

    #[test]
    fn strings_and_names() {
        assert_eq!(string("LNRO0005"), b"\x0dLNRO0005\x00");
        assert_eq!(
            name(b"_UID", &integer(7)),
            [0x08, b'_', b'U', b'I', b'D', 0x0a, 7]
        );
        assert!(is_name_seg(b"_SB_"));
        assert!(is_name_seg(b"COM1"));
        assert!(is_name_seg(b"V0FF"));
        assert!(!is_name_seg(b"1ABC"));
        assert!(!is_name_seg(b"ab__"));
        assert!(!is_name_seg(b"A-B_"));
    }

    #[test]
    fn packages_count_their_elements() {
        // Package () { 0x05, Zero }, as iasl compiles it: PackageOp,
        // PkgLength 5 (itself, NumElements, 0x0a 0x05, 0x00), 2 elements.
        assert_eq!(
            package_of(&[&integer(5), &integer(0)]),
            [0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]
        );
        assert_eq!(package_of(&[]), [0x12, 0x02, 0x00]);
        let one = integer(1);
        let many = vec![one.as_slice(); 300];
        let p = package_of(&many);
        // 255 OneOps, NumElements 255, a two-byte PkgLength: 255 + 1 + 2.
        assert_eq!(&p[..4], [0x12, 0x42, 0x10, 0xff]);
        assert_eq!(p.len(), 1 + 2 + 1 + 255);
        assert_eq!(decode_pkg_length(&p[1..]), (258, 2));
    }

    #[test]
    fn resource_descriptors() {
        assert_eq!(
            memory32_fixed(0xd000_0000, 0x1000),
            [0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00]
        );
        assert_eq!(
            io(0x3f8, 0x3f8, 1, 8),
            [0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        );
        assert_eq!(
            extended_interrupt(4),
            [0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]
        );
        // Empty template: BufferOp, PkgLength 5 (itself + 4), size 2, End Tag.
        assert_eq!(resource_template(&[]), [0x11, 0x05, 0x0a, 0x02, 0x79, 0x00]);
    }

    #[test]
    fn scope_device_and_buffer_wrap_their_bodies() {
        assert_eq!(
            scope(&[ROOT_CHAR, b'_', b'S', b'B', b'_'], &[]),
            [0x10, 0x06, 0x5c, b'_', b'S', b'B', b'_']
        );
        assert_eq!(
            device(b"ABCD", &[0xaa]),
            [0x5b, 0x82, 0x06, b'A', b'B', b'C', b'D', 0xaa]
        );
        // A 300-byte buffer: size needs a WordPrefix, the package two bytes.
        let b = buffer(&[0; 300]);
        // 3 + 300 + 2 = 305 = 0x131: lead 0x41, then 0x13.
        assert_eq!(&b[..6], [0x11, 0x41, 0x13, 0x0b, 0x2c, 0x01]);
        assert_eq!(b.len(), 1 + 2 + 3 + 300);
        assert_eq!(decode_pkg_length(&b[1..]), (305, 2));
    }
}
