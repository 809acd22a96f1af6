//! Helpers for tests: the `/dev/kvm` guard, the process's resident set, a small
//! deterministic random generator.

use std::fs::OpenOptions;

/// Environment variable that turns a missing or unusable `/dev/kvm` into a test failure.
/// `.ci/run` sets it on machines where KVM is expected.
pub const REQUIRE_KVM_ENV: &str = "EMBER_REQUIRE_KVM";

/// Checks that `/dev/kvm` can be opened for reading and writing.
///
/// Returns `true` when the calling test can go on. When KVM is not usable it prints a
/// loud line naming the test, and then panics if [`REQUIRE_KVM_ENV`] is set to `1`, so
/// that a test never passes silently without running. Call it first in every KVM test:
///
/// ```
/// if !ember_guests::testing::kvm_available("doc_example") {
///     return;
/// }
/// // ... create a VM ...
/// ```
pub fn kvm_available(test: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(err) => {
            let required = std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1");
            eprintln!(
                "!!! KVM UNAVAILABLE: test `{test}` did NOT run: cannot open /dev/kvm: {err}{}",
                if required {
                    ""
                } else {
                    " (set EMBER_REQUIRE_KVM=1 to make this fatal)"
                }
            );
            assert!(
                !required,
                "{test}: KVM is required ({REQUIRE_KVM_ENV}=1) but /dev/kvm is unusable: {err}"
            );
            false
        }
    }
}

/// Resident set size of this process in bytes (`/proc/self/statm`, second field), for
/// tests that check memory is given back.
///
/// ```
/// assert!(ember_guests::testing::rss_bytes() > 0);
/// ```
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm")
        .unwrap_or_else(|e| panic!("cannot read /proc/self/statm: {e}"));
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("unexpected /proc/self/statm: {statm:?}"));
    // SAFETY: sysconf only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_size).unwrap_or(4096)
}

/// A tiny xorshift64 generator for tests that want deterministic pseudo-random input
/// without a dependency.
///
/// ```
/// let mut rng = ember_guests::testing::XorShift::new(7);
/// assert_ne!(rng.next(), rng.next());
/// ```
pub struct XorShift(u64);

impl XorShift {
    /// A generator seeded with `seed` (0 is replaced by 1: xorshift needs a non-zero
    /// state).
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
