//! Fuzz harnesses for everything a guest or a user controls in Ember.
//!
//! Each module of [`targets`] has a `pub fn run(data: &[u8])`: the whole logic of one
//! cargo-fuzz target. `fuzz_targets/<name>.rs` only hands libFuzzer's input to it, and
//! this crate's tests feed every file of `corpus/<name>/` and `regressions/<name>/`
//! through the same function on a stable toolchain, so `cargo test` replays them all.
//!
//! A harness panics (and the fuzzer reports a crash) when the code under test panics,
//! or when one of the invariants the harness checks after each step does not hold.
//!
//! Structure-aware targets decode their input with [`arbitrary`]. Their input types are
//! declared with [`input_struct!`], which also implements [`Encode`], the inverse of the
//! decoding, so that [`seeds`] can write hand-made, valid inputs reproducibly.

pub mod common;
pub mod seeds;
pub mod targets;

/// Writes a value the way its `Arbitrary` implementation reads it back (arbitrary 1.x:
/// integers little endian, `bool` as one byte, `Option` as a flag byte, `Vec` as a
/// "one more" byte before each element and a 0 byte at the end).
///
/// The seed tests check the round trip, so a change in `arbitrary`'s format shows up
/// as a failing test, not as silently useless seeds.
pub trait Encode {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// The encoding of `self`.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_int!(u8, u16, u32, u64);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<const N: usize> Encode for [u8; N] {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.encode(out);
            }
        }
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in self {
            out.push(1);
            v.encode(out);
        }
        out.push(0);
    }
}

/// Declares a structure-aware input type: a struct deriving `Arbitrary` (fields read in
/// order) and [`Encode`] (fields written in the same order). Fields may only be
/// integers, `bool`, byte arrays, `Option`, `Vec` and other `input_struct!` types:
/// choices are `u8` selectors taken modulo the number of cases, which keeps the
/// encoding trivial.
#[macro_export]
macro_rules! input_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(arbitrary::Arbitrary, Debug, Clone, PartialEq, Eq, Default)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty),*
        }

        impl $crate::Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                $($crate::Encode::encode(&self.$field, out);)*
            }
        }
    };
}

/// Decodes a structure-aware input: missing bytes read as zeroes, as `arbitrary` does.
pub fn decode<'a, T: arbitrary::Arbitrary<'a>>(data: &'a [u8]) -> Option<T> {
    let mut u = arbitrary::Unstructured::new(data);
    T::arbitrary(&mut u).ok()
}

/// A target's harness.
pub type Harness = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and the corpus directory) and its
/// harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("virtio_queue", targets::virtio_queue::run),
    ("virtio_blk", targets::virtio_blk::run),
    ("virtio_net", targets::virtio_net::run),
    ("virtio_rng", targets::virtio_rng::run),
    ("virtio_mmio", targets::virtio_mmio::run),
    ("bus", targets::bus::run),
    ("serial", targets::serial::run),
    ("i8042", targets::i8042::run),
    ("boot_elf", targets::boot_elf::run),
    ("boot_pvh", targets::boot_pvh::run),
    ("boot_bzimage", targets::boot_bzimage::run),
    ("cmdline", targets::cmdline::run),
    ("initrd", targets::initrd::run),
    ("boot_tables", targets::boot_tables::run),
    ("rate_limiter", targets::rate_limiter::run),
    ("snapshot_state", targets::snapshot_state::run),
];

#[cfg(test)]
mod tests;
