//! Small x86-64 guests assembled in Rust with iced-x86, for Ember's demo, tests and
//! benchmarks, plus the guard every KVM test calls first.
//!
//! Guest kernel-mode code is emulated instruction by instruction on nested KVM hosts
//! (about 1 us per instruction), so the guests here are short, use no SSE, and loop
//! only where a test needs a loop.

#![deny(missing_docs)]

pub mod testing;
