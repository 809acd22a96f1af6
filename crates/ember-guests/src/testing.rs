//! Helpers for tests that need `/dev/kvm`.

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
