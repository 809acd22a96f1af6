//! Token-bucket rate limiters for virtio devices, and rate-limited logging for
//! guest-triggered messages.
//!
//! * [`TokenBucket`]: a bucket of `size` tokens refilled continuously over
//!   `refill_time_ms`, with a one-time burst spent first that never refills, and
//!   over-consumption for requests larger than the bucket (allowed once, then repaid
//!   before new tokens count), after Firecracker's `rate_limiter` crate.
//! * [`RateLimiter`]: a bandwidth bucket (bytes) and an operations bucket (requests), and
//!   a timerfd armed, when a request is refused, for the moment enough tokens are back.
//!   A device worker waits on that fd beside its queues (it is `CLOEXEC` and
//!   non-blocking), leaves requests in the ring while blocked, and calls
//!   [`RateLimiter::event_handler`] when it fires.
//! * [`state`]: a limiter's bucket levels for snapshots ([`RateLimiter::save_state`],
//!   [`RateLimiter::restore_state`]).
//! * [`log_limit`] and the [`warn_limited!`], [`error_limited!`] and [`info_limited!`]
//!   macros: at most 10 lines per 5 s from each call site for each device (the thread's
//!   [`log_limit::LogSource`]), with a count of what was
//!   suppressed, for log lines a guest can trigger.
//!
//! * `testing` (feature `test-utils`): a logger that records every line, and the most
//!   lines rate-limited call sites may log in a given time, for tests that count what a
//!   guest can make a VMM log.
//!
//! No KVM, no threads: the limiter is a plain value owned by the device's worker.
//!
//! ```
//! use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig, TokenType};
//!
//! // 1 MiB/s, 1 MiB bursts, plus 4 MiB once at start.
//! let config = RateLimiterConfig {
//!     bandwidth: Some(TokenBucketConfig { size: 1 << 20, one_time_burst: 4 << 20, refill_time_ms: 1000 }),
//!     ops: None,
//! };
//! let mut limiter = RateLimiter::new(&config)?;
//! let mut sent = 0u64;
//! while limiter.consume(64 * 1024, TokenType::Bytes) {
//!     sent += 64 * 1024;
//! }
//! // Burst and bucket, and maybe a little refill while the loop ran.
//! assert!(sent >= 5 << 20);
//! assert!(limiter.is_blocked());
//! # Ok::<(), ember_rate_limiter::RateLimiterError>(())
//! ```

#![deny(missing_docs)]

mod bucket;
mod limiter;
pub mod log_limit;
pub mod state;
#[cfg(feature = "test-utils")]
pub mod testing;

use std::io;

pub use bucket::{BucketReduction, TokenBucket, TokenBucketConfig, MAX_REFILL_TIME_MS};
pub use limiter::{RateLimiter, RateLimiterConfig, TokenType, MIN_TIMER_WAIT};
pub use state::{RateLimiterState, TokenBucketState};

/// The log crate the `*_limited!` macros log through.
pub use log;

/// Errors from setting up or servicing a rate limiter; each names the bad value.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// A bucket with size 0 would refuse everything; leave the bucket out for no limit.
    #[error("token bucket size is 0 (refill time {refill_time_ms} ms): the size must be > 0; leave the bucket out for no limit")]
    ZeroSize {
        /// The refill time given with it.
        refill_time_ms: u64,
    },
    /// A bucket with refill time 0 would never limit.
    #[error("token bucket refill time is 0 ms (size {size}): it must be at least 1 ms")]
    ZeroRefillTime {
        /// The size given with it.
        size: u64,
    },
    /// The refill time is longer than [`MAX_REFILL_TIME_MS`].
    #[error("token bucket refill time {refill_time_ms} ms is longer than the maximum {MAX_REFILL_TIME_MS} ms")]
    RefillTimeTooLong {
        /// The refill time given.
        refill_time_ms: u64,
    },
    /// A [`RateLimiterConfig`] bucket is invalid.
    #[error("invalid {token_type} bucket: {source}")]
    Bucket {
        /// Which bucket.
        token_type: TokenType,
        /// What is wrong with it.
        #[source]
        source: Box<RateLimiterError>,
    },
    /// A timerfd operation failed.
    #[error("rate limiter timer: {op} failed: {source}")]
    Timer {
        /// The call that failed, e.g. "timerfd_create".
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A saved bucket level is larger than the bucket's settings allow.
    #[error("saved {field} {value} is more than the bucket allows ({max})")]
    StateOutOfRange {
        /// Which level: "budget", "one-time burst", "debt".
        field: &'static str,
        /// The saved value.
        value: u64,
        /// The most it may be.
        max: u64,
    },
    /// A saved state has a bucket the limiter does not have, or the other way round.
    #[error("{}", if *saved {
        format!("the saved state has {token_type} bucket levels but the limiter has no {token_type} bucket")
    } else {
        format!("the saved state has no levels for the limiter's {token_type} bucket")
    })]
    StateBucketMismatch {
        /// Which bucket.
        token_type: TokenType,
        /// Whether the saved state has it.
        saved: bool,
    },
    /// A device was given another number of saved limiter states than it has limiters.
    #[error("{got} saved rate limiter states for a device with {expected} rate limiters")]
    StateCount {
        /// The device's limiters.
        expected: usize,
        /// The states given.
        got: usize,
    },
    /// [`RateLimiter::event_handler`] was called but the timer had not expired.
    #[error("rate limiter timer event handled before the timer expired")]
    SpuriousEvent,
}

/// The README's example, compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
