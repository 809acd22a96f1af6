//! Saved levels of a [`RateLimiter`](crate::RateLimiter)'s buckets, for snapshots: plain
//! data with serde support, produced by [`RateLimiter::save_state`] and consumed by
//! [`RateLimiter::restore_state`] on a limiter built with the same settings.
//!
//! A state read back from a file is untrusted: the restore checks it against the
//! limiter's settings and refuses what does not fit, naming the value.
//!
//! [`RateLimiter::save_state`]: crate::RateLimiter::save_state
//! [`RateLimiter::restore_state`]: crate::RateLimiter::restore_state

use serde::{Deserialize, Serialize};

/// One bucket's levels at the moment it was saved (refill up to then included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketState {
    /// Tokens in the bucket: at most its size.
    pub budget: u64,
    /// One-time burst tokens left: at most the configured burst.
    pub one_time_burst: u64,
    /// Tokens owed after an over-consumption (only with an empty bucket).
    pub debt: u64,
}

/// A limiter's saved levels: one per bucket it has, `None` for a bucket it does not
/// have. The default (both `None`) is the state of no limiter at all, which a device
/// without limits saves and restores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterState {
    /// The bandwidth bucket's levels.
    pub bandwidth: Option<TokenBucketState>,
    /// The operations bucket's levels.
    pub ops: Option<TokenBucketState>,
}

impl RateLimiterState {
    /// True when the state has no bucket: the state of an unlimited device.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}
