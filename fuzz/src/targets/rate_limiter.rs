//! The token-bucket rate limiter ([`ember_rate_limiter::RateLimiter`]): any bucket
//! settings a user can give on the command line (sizes, one-time bursts and refill
//! times up to `u64::MAX`), then any sequence of the charges a guest's requests cause
//! (any token count: a guest picks its request lengths), put-backs and timer events.
//!
//! Checked: settings are refused exactly when a size is 0 or a refill time is outside
//! `1..=MAX_REFILL_TIME_MS`; no operation
//! panics (no overflow in the refill arithmetic); a bucket never holds more than its
//! size, nor a burst more than its initial burst; a refused `consume` leaves the
//! limiter blocked, and a blocked limiter has its timer armed or expired (readable).

use ember_rate_limiter::{
    RateLimiter, RateLimiterConfig, TokenBucketConfig, TokenType, MAX_REFILL_TIME_MS,
};

use crate::{decode, input_struct};

input_struct! {
    /// One bucket's settings, or none (`present` false).
    pub struct Bucket {
        pub present: bool,
        pub size: u64,
        pub one_time_burst: u64,
        pub refill_time_ms: u64,
    }
}

input_struct! {
    /// `kind % 5`: consume, force_consume, manual_replenish, the timer firing
    /// (`event_handler`), or reading the timer; `bytes` picks the token type.
    pub struct LimiterOp {
        pub kind: u8,
        pub bytes: bool,
        pub tokens: u64,
    }
}

input_struct! {
    /// The limiter's two buckets, then the operations.
    pub struct LimiterInput {
        pub bandwidth: Bucket,
        pub ops: Bucket,
        pub steps: Vec<LimiterOp>,
    }
}

fn config(bucket: &Bucket) -> Option<TokenBucketConfig> {
    bucket.present.then_some(TokenBucketConfig {
        size: bucket.size,
        one_time_burst: bucket.one_time_burst,
        refill_time_ms: bucket.refill_time_ms,
    })
}

fn valid(bucket: &Option<TokenBucketConfig>) -> bool {
    bucket.is_none_or(|b| b.size > 0 && (1..=MAX_REFILL_TIME_MS).contains(&b.refill_time_ms))
}

/// Whether the limiter's timerfd is readable (it expired and was not yet handled).
fn timer_fired(limiter: &RateLimiter) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: limiter.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fd` is one valid pollfd, and the timeout 0 makes the call return at once.
    unsafe { libc::poll(&mut fd, 1, 0) == 1 }
}

/// The harness.
pub fn run(data: &[u8]) {
    let Some(input) = decode::<LimiterInput>(data) else {
        return;
    };
    let config = RateLimiterConfig {
        bandwidth: config(&input.bandwidth),
        ops: config(&input.ops),
    };
    let expect_ok = valid(&config.bandwidth) && valid(&config.ops);
    let mut limiter = match RateLimiter::new(&config) {
        Ok(limiter) => {
            assert!(expect_ok, "accepted bad settings {config:?}");
            limiter
        }
        Err(e) => {
            // Out of file descriptors is not the settings' fault.
            assert!(
                !expect_ok || e.to_string().contains("timer"),
                "{config:?}: {e}"
            );
            return;
        }
    };
    for step in input.steps.iter().take(256) {
        let token_type = if step.bytes {
            TokenType::Bytes
        } else {
            TokenType::Ops
        };
        match step.kind % 5 {
            0 => {
                if !limiter.consume(step.tokens, token_type) {
                    assert!(limiter.is_blocked(), "refused but not blocked");
                }
            }
            1 => limiter.force_consume(step.tokens, token_type),
            2 => limiter.manual_replenish(step.tokens, token_type),
            3 => {
                // The timer need not have expired: the handler must cope.
                let _ = limiter.event_handler();
            }
            _ => {
                // Blocked means a wake-up is coming: the timer is armed, or it expired
                // and its fd is readable (the worker's epoll then calls the handler).
                let armed = limiter.timer_remaining();
                if limiter.is_blocked() && matches!(armed, Ok(None)) {
                    assert!(timer_fired(&limiter), "blocked with no wake-up coming");
                }
            }
        }
        for (bucket, settings) in [
            (limiter.bandwidth(), config.bandwidth),
            (limiter.ops(), config.ops),
        ] {
            if let (Some(bucket), Some(settings)) = (bucket, settings) {
                assert!(bucket.budget() <= settings.size, "{:?}", bucket.budget());
                assert!(bucket.one_time_burst() <= settings.one_time_burst);
            }
        }
    }
}
