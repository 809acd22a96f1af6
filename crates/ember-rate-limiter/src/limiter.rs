//! [`RateLimiter`]: a bandwidth bucket and an operations bucket, and the timerfd that
//! says when a blocked limiter has tokens again.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::bucket::{BucketReduction, TokenBucket, TokenBucketConfig};
use crate::state::{RateLimiterState, TokenBucketState};
use crate::RateLimiterError;

/// The shortest wait the timer is armed for: a blocked limiter wakes its device at most
/// this often, however small the requests (1 ms). Tokens accrue by elapsed time, so this
/// costs latency, never rate.
pub const MIN_TIMER_WAIT: Duration = Duration::from_millis(1);

/// A limiter's settings: a bandwidth bucket (tokens are bytes) and/or an operations
/// bucket (tokens are requests). A missing bucket does not limit.
///
/// ```
/// use ember_rate_limiter::{RateLimiterConfig, TokenBucketConfig};
///
/// // 10 MB/s and 1000 requests/s.
/// let config = RateLimiterConfig {
///     bandwidth: Some(TokenBucketConfig { size: 1_000_000, one_time_burst: 0, refill_time_ms: 100 }),
///     ops: Some(TokenBucketConfig { size: 100, one_time_burst: 0, refill_time_ms: 100 }),
/// };
/// assert!(!config.is_unlimited());
/// assert!(ember_rate_limiter::RateLimiterConfig::default().is_unlimited());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateLimiterConfig {
    /// The bandwidth bucket, in bytes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// The operations bucket, in requests.
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// True when neither bucket is set: a limiter from this config never blocks.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// Which bucket a request counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// The bandwidth bucket: bytes.
    Bytes,
    /// The operations bucket: requests.
    Ops,
}

impl fmt::Display for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenType::Bytes => "bandwidth",
            TokenType::Ops => "ops",
        })
    }
}

/// A rate limiter for one device queue (or direction): a bandwidth bucket, an operations
/// bucket, and a timerfd.
///
/// A device asks [`consume`](Self::consume) before each request. When a bucket is
/// short, `consume` returns `false`, arms the timer for when enough tokens will have
/// come back, and the limiter stays *blocked* (every `consume` fails) until the device
/// calls [`event_handler`](Self::event_handler) after the timer's fd (this type's
/// [`AsRawFd`]) turns readable. A device puts that fd among its worker's backend fds,
/// leaves requests in the ring while blocked, and resumes on the timer.
///
/// The fd is `CLOEXEC` and non-blocking, on `CLOCK_MONOTONIC`.
///
/// ```
/// use std::os::fd::AsRawFd;
/// use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig, TokenType};
///
/// let mut limiter = RateLimiter::new(&RateLimiterConfig {
///     bandwidth: Some(TokenBucketConfig { size: 4096, one_time_burst: 0, refill_time_ms: 10 }),
///     ops: None,
/// })?;
/// assert!(limiter.consume(4096, TokenType::Bytes));
/// assert!(limiter.consume(1_000_000, TokenType::Ops)); // no ops bucket: no limit
/// // Empty now: blocked until the timer fires (in about 10 ms).
/// assert!(!limiter.consume(4096, TokenType::Bytes));
/// assert!(limiter.is_blocked());
///
/// // What a device worker does: wait for the fd, then call event_handler.
/// let mut pfd = libc::pollfd { fd: limiter.as_raw_fd(), events: libc::POLLIN, revents: 0 };
/// // SAFETY: one valid pollfd.
/// assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
/// limiter.event_handler()?;
/// assert!(!limiter.is_blocked());
/// assert!(limiter.consume(4096, TokenType::Bytes));
/// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
/// ```
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: OwnedFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with full buckets, or an error naming the bucket and the bad value; the
    /// timerfd is created here.
    ///
    /// ```
    /// use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig};
    ///
    /// let bad = RateLimiterConfig {
    ///     bandwidth: None,
    ///     ops: Some(TokenBucketConfig { size: 0, one_time_burst: 0, refill_time_ms: 1000 }),
    /// };
    /// let err = RateLimiter::new(&bad).unwrap_err();
    /// assert!(err.to_string().contains("ops bucket"), "{err}");
    /// ```
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        let now = Instant::now();
        let bucket = |config: Option<TokenBucketConfig>, token_type| {
            config
                .map(|c| TokenBucket::new_at(c, now))
                .transpose()
                .map_err(|source| RateLimiterError::Bucket {
                    token_type,
                    source: Box::new(source),
                })
        };
        let bandwidth = bucket(config.bandwidth, TokenType::Bytes)?;
        let ops = bucket(config.ops, TokenType::Ops)?;
        Ok(RateLimiter {
            bandwidth,
            ops,
            timer: new_timerfd()?,
            blocked: false,
        })
    }

    /// Takes `tokens` from the bucket of `token_type`: `true` if the request may go
    /// ahead (always, when there is no such bucket), `false` if the limiter is blocked.
    ///
    /// A request larger than the bucket is allowed once (over-consumption): it returns
    /// `true` and blocks the limiter until the debt is repaid. On `false` nothing was
    /// taken and the timer is armed; retry after [`event_handler`](Self::event_handler).
    /// A device that takes from both buckets and is refused by the second gives the
    /// first back with [`manual_replenish`](Self::manual_replenish).
    ///
    /// ```
    /// use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig, TokenType};
    ///
    /// let mut limiter = RateLimiter::new(&RateLimiterConfig {
    ///     bandwidth: None,
    ///     ops: Some(TokenBucketConfig { size: 2, one_time_burst: 0, refill_time_ms: 60_000 }),
    /// })?;
    /// assert!(limiter.consume(1, TokenType::Ops));
    /// assert!(limiter.consume(1, TokenType::Ops));
    /// assert!(!limiter.consume(1, TokenType::Ops));
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        if self.blocked {
            return false;
        }
        let now = Instant::now();
        let Some(bucket) = self.bucket_mut(token_type) else {
            return true;
        };
        let (allowed, wait) = match bucket.reduce_at(tokens, now) {
            BucketReduction::Success => return true,
            BucketReduction::OverConsumption(_) => (true, bucket.time_until_available_at(0, now)),
            BucketReduction::Failure => (false, bucket.time_until_available_at(tokens, now)),
        };
        if let Err(e) = self.arm(wait) {
            // Without a timer nothing would unblock the device: let the request through.
            crate::error_limited!("rate limiter: cannot arm the timer ({e}); not limiting");
            if !allowed {
                return self.consume_unarmed(tokens, token_type);
            }
            return true;
        }
        self.blocked = true;
        allowed
    }

    /// Takes `tokens` from the bucket of `token_type` for work already done (a frame
    /// already read from a tap), whether or not it has them: what it lacks becomes a
    /// debt, and the limiter blocks (timer armed) until the debt is repaid.
    ///
    /// ```
    /// use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig, TokenType};
    ///
    /// let mut limiter = RateLimiter::new(&RateLimiterConfig {
    ///     bandwidth: Some(TokenBucketConfig { size: 1500, one_time_burst: 0, refill_time_ms: 100 }),
    ///     ops: None,
    /// })?;
    /// limiter.force_consume(1000, TokenType::Bytes);
    /// assert!(!limiter.is_blocked());
    /// limiter.force_consume(1000, TokenType::Bytes); // 500 owed
    /// assert!(limiter.is_blocked());
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn force_consume(&mut self, tokens: u64, token_type: TokenType) {
        let now = Instant::now();
        let Some(bucket) = self.bucket_mut(token_type) else {
            return;
        };
        if bucket.force_reduce_at(tokens, now) == BucketReduction::Success {
            return;
        }
        let wait = bucket.time_until_available_at(0, now);
        match self.arm(wait) {
            Ok(()) => self.blocked = true,
            Err(e) => {
                crate::error_limited!("rate limiter: cannot arm the timer ({e}); not limiting")
            }
        }
    }

    /// A request let through because the timer failed: take what the bucket has.
    fn consume_unarmed(&mut self, tokens: u64, token_type: TokenType) -> bool {
        if let Some(bucket) = self.bucket_mut(token_type) {
            let budget = bucket.budget();
            bucket.reduce_at(tokens.min(budget), Instant::now());
        }
        true
    }

    /// Puts `tokens` back into the bucket of `token_type` (see
    /// [`TokenBucket::force_replenish`]); it does not unblock the limiter.
    ///
    /// ```
    /// use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig, TokenType};
    ///
    /// let mut limiter = RateLimiter::new(&RateLimiterConfig {
    ///     bandwidth: None,
    ///     ops: Some(TokenBucketConfig { size: 1, one_time_burst: 0, refill_time_ms: 60_000 }),
    /// })?;
    /// assert!(limiter.consume(1, TokenType::Ops));
    /// limiter.manual_replenish(1, TokenType::Ops); // the request could not be done after all
    /// assert!(limiter.consume(1, TokenType::Ops));
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn manual_replenish(&mut self, tokens: u64, token_type: TokenType) {
        if let Some(bucket) = self.bucket_mut(token_type) {
            bucket.force_replenish(tokens);
        }
    }

    /// True from a refused [`consume`](Self::consume) (or an over-consumption) until
    /// [`event_handler`](Self::event_handler) sees the timer expire.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Handles the timer: call it when this limiter's fd is readable. It reads the
    /// expiry count and unblocks the limiter. An fd that was not readable (the timer has
    /// not expired) is [`RateLimiterError::SpuriousEvent`] and leaves the limiter as it
    /// was.
    ///
    /// ```
    /// use ember_rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
    ///
    /// let mut limiter = RateLimiter::new(&RateLimiterConfig::default())?;
    /// assert!(matches!(limiter.event_handler(), Err(RateLimiterError::SpuriousEvent)));
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        let mut expirations = [0u8; 8];
        loop {
            // SAFETY: `timer` is an open fd owned by `self`; the buffer is 8 writable
            // bytes, the size a timerfd read needs.
            let ret = unsafe {
                libc::read(
                    self.timer.as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if ret >= 0 {
                break;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Err(RateLimiterError::SpuriousEvent),
                _ => {
                    return Err(RateLimiterError::Timer {
                        op: "read",
                        source: err,
                    })
                }
            }
        }
        self.blocked = false;
        Ok(())
    }

    /// The buckets' levels now, for a snapshot of a paused device. Whether the limiter
    /// is blocked follows from them: a limiter in debt is restored blocked, and one
    /// short of tokens blocks again on its first refused request.
    ///
    /// ```
    /// use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig, TokenType};
    ///
    /// let config = RateLimiterConfig {
    ///     bandwidth: None,
    ///     ops: Some(TokenBucketConfig { size: 10, one_time_burst: 0, refill_time_ms: 60_000 }),
    /// };
    /// let mut limiter = RateLimiter::new(&config)?;
    /// assert!(limiter.consume(10, TokenType::Ops));
    /// let saved = limiter.save_state();
    ///
    /// // The new process: the same settings, and the levels of the old one.
    /// let mut restored = RateLimiter::new(&config)?;
    /// restored.restore_state(&saved)?;
    /// assert!(!restored.consume(1, TokenType::Ops));
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn save_state(&mut self) -> RateLimiterState {
        RateLimiterState {
            bandwidth: self.bandwidth.as_mut().map(TokenBucket::save_state),
            ops: self.ops.as_mut().map(TokenBucket::save_state),
        }
    }

    /// Sets the buckets' levels to `state`, saved by [`save_state`](Self::save_state)
    /// from a limiter with the same settings, into a limiter not used yet; refill counts
    /// from now. A bucket in debt blocks the limiter, its timer armed for when the debt
    /// is repaid (a failure to arm it is [`RateLimiterError::Timer`]). Refused, with the
    /// limiter left as it was:
    /// a bucket the state has and the limiter does not, or the other way round
    /// ([`RateLimiterError::StateBucketMismatch`]), or a level the bucket cannot hold
    /// ([`RateLimiterError::Bucket`] naming the bucket, around
    /// [`RateLimiterError::StateOutOfRange`]).
    ///
    /// ```
    /// use ember_rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterState, TokenBucketState};
    ///
    /// let mut unlimited = RateLimiter::new(&RateLimiterConfig::default())?;
    /// let one_bucket = RateLimiterState {
    ///     bandwidth: Some(TokenBucketState { budget: 0, one_time_burst: 0, debt: 0 }),
    ///     ops: None,
    /// };
    /// let err = unlimited.restore_state(&one_bucket).unwrap_err();
    /// assert!(err.to_string().contains("bandwidth"), "{err}");
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn restore_state(&mut self, state: &RateLimiterState) -> Result<(), RateLimiterError> {
        self.check_state(state)?;
        let now = Instant::now();
        let mut repaid_in = None;
        for (bucket, saved) in [
            (self.bandwidth.as_mut(), state.bandwidth.as_ref()),
            (self.ops.as_mut(), state.ops.as_ref()),
        ] {
            if let (Some(bucket), Some(saved)) = (bucket, saved) {
                bucket.restore_state(saved)?;
                if saved.debt > 0 {
                    let wait = bucket.time_until_available_at(0, now);
                    repaid_in = repaid_in.max(Some(wait));
                }
            }
        }
        // A limiter in debt was blocked when it was saved (devices that charge after
        // the fact only look at `is_blocked`): blocked again, until the debt is repaid.
        if let Some(wait) = repaid_in {
            self.arm(wait)?;
            self.blocked = true;
        }
        Ok(())
    }

    /// What [`restore_state`](Self::restore_state) would say about `state`, changing
    /// nothing: for a device that restores several limiters all or none.
    pub fn check_state(&self, state: &RateLimiterState) -> Result<(), RateLimiterError> {
        check_bucket(
            self.bandwidth.as_ref(),
            state.bandwidth.as_ref(),
            TokenType::Bytes,
        )?;
        check_bucket(self.ops.as_ref(), state.ops.as_ref(), TokenType::Ops)
    }

    /// The bandwidth bucket, if the limiter has one.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, if the limiter has one.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// How long until the armed timer expires (`None` if it is not armed).
    pub fn timer_remaining(&self) -> Result<Option<Duration>, RateLimiterError> {
        let mut spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        // SAFETY: `timer` is an open timerfd owned by `self`; `spec` is a valid,
        // writable itimerspec.
        let ret = unsafe { libc::timerfd_gettime(self.timer.as_raw_fd(), &mut spec) };
        if ret < 0 {
            return Err(RateLimiterError::Timer {
                op: "timerfd_gettime",
                source: io::Error::last_os_error(),
            });
        }
        let value = spec.it_value;
        if value.tv_sec == 0 && value.tv_nsec == 0 {
            return Ok(None);
        }
        // The kernel returns 0 <= tv_nsec < 10^9 and tv_sec >= 0.
        Ok(Some(Duration::new(
            u64::try_from(value.tv_sec).unwrap_or(0),
            u32::try_from(value.tv_nsec).unwrap_or(0),
        )))
    }

    fn bucket_mut(&mut self, token_type: TokenType) -> Option<&mut TokenBucket> {
        match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Arms the one-shot timer for `wait` (at least [`MIN_TIMER_WAIT`]).
    fn arm(&self, wait: Duration) -> Result<(), RateLimiterError> {
        let wait = wait.max(MIN_TIMER_WAIT);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(wait.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(wait.subsec_nanos()),
            },
        };
        // SAFETY: `timer` is an open timerfd owned by `self`; `spec` is a valid
        // itimerspec (tv_nsec < 10^9); the old value is not asked for (null).
        let ret = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        if ret < 0 {
            return Err(RateLimiterError::Timer {
                op: "timerfd_settime",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

fn new_timerfd() -> Result<OwnedFd, RateLimiterError> {
    // SAFETY: plain syscall with constant flags; the result is checked below.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(RateLimiterError::Timer {
            op: "timerfd_create",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by timerfd_create, is open and owned by nobody
    // else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Refuses a saved bucket that does not match the limiter's (present in one only, or
/// out of range), naming the bucket.
fn check_bucket(
    bucket: Option<&TokenBucket>,
    saved: Option<&TokenBucketState>,
    token_type: TokenType,
) -> Result<(), RateLimiterError> {
    match (bucket, saved) {
        (None, None) => Ok(()),
        (Some(bucket), Some(saved)) => {
            bucket
                .check_state(saved)
                .map_err(|source| RateLimiterError::Bucket {
                    token_type,
                    source: Box::new(source),
                })
        }
        (bucket, _) => Err(RateLimiterError::StateBucketMismatch {
            token_type,
            saved: bucket.is_none(),
        }),
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

impl AsFd for RateLimiter {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.timer.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_time_ms: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms,
        })
    }

    fn wait_readable(limiter: &RateLimiter, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: limiter.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
    }

    #[test]
    fn timerfd_is_cloexec_and_nonblocking() {
        let limiter = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        // SAFETY: F_GETFD/F_GETFL on an open fd.
        let (fd_flags, fl_flags) = unsafe {
            (
                libc::fcntl(limiter.as_raw_fd(), libc::F_GETFD),
                libc::fcntl(limiter.as_raw_fd(), libc::F_GETFL),
            )
        };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        assert_ne!(fl_flags & libc::O_NONBLOCK, 0);
        assert_eq!(limiter.as_fd().as_raw_fd(), limiter.as_raw_fd());
    }

    #[test]
    fn unlimited_never_blocks() {
        let mut limiter = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        for _ in 0..1000 {
            assert!(limiter.consume(u64::MAX, TokenType::Bytes));
            assert!(limiter.consume(u64::MAX, TokenType::Ops));
        }
        assert!(!limiter.is_blocked());
        assert_eq!(limiter.timer_remaining().unwrap(), None);
    }

    #[test]
    fn refusal_arms_the_timer_for_the_missing_tokens() {
        // 1000 bytes per 10 s: 100 missing bytes take 1 s.
        let mut limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(1000, 0, 10_000),
            ops: None,
        })
        .unwrap();
        assert_eq!(limiter.timer_remaining().unwrap(), None);
        assert!(limiter.consume(900, TokenType::Bytes));
        assert!(!limiter.is_blocked());
        assert!(!limiter.consume(200, TokenType::Bytes));
        assert!(limiter.is_blocked());
        let remaining = limiter.timer_remaining().unwrap().expect("timer armed");
        assert!(remaining <= Duration::from_secs(1), "{remaining:?}");
        // Blocked: even a request that fits is refused until the timer is handled.
        assert!(!limiter.consume(1, TokenType::Bytes));
        assert!(matches!(
            limiter.event_handler(),
            Err(RateLimiterError::SpuriousEvent)
        ));
        assert!(limiter.is_blocked());
        // Nothing was taken by the refusals.
        assert!(limiter.bandwidth().unwrap().budget() >= 100);
    }

    #[test]
    fn timer_fires_and_unblocks() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: None,
            ops: bucket(1, 0, 20),
        })
        .unwrap();
        assert!(limiter.consume(1, TokenType::Ops));
        assert!(!limiter.consume(1, TokenType::Ops));
        assert!(wait_readable(&limiter, 10_000), "timer never fired");
        // Lower bound only: the refill of one op takes 20 ms.
        assert!(start.elapsed() >= Duration::from_millis(15));
        limiter.event_handler().unwrap();
        assert!(!limiter.is_blocked());
        assert!(limiter.consume(1, TokenType::Ops));
        assert!(!wait_readable(&limiter, 0));
    }

    #[test]
    fn over_consumption_is_allowed_then_blocks_for_the_debt() {
        let mut limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(100, 0, 1000),
            ops: None,
        })
        .unwrap();
        // 350 > 100: allowed, 250 owed = 2.5 s.
        assert!(limiter.consume(350, TokenType::Bytes));
        assert!(limiter.is_blocked());
        let remaining = limiter.timer_remaining().unwrap().expect("timer armed");
        assert!(remaining <= Duration::from_millis(2500), "{remaining:?}");
        assert!(!limiter.consume(1, TokenType::Bytes));
        assert_eq!(limiter.bandwidth().unwrap().debt(), 250);
    }

    #[test]
    fn force_consume_blocks_for_the_debt() {
        let mut limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(1000, 0, 1000),
            ops: bucket(1, 0, 1000),
        })
        .unwrap();
        limiter.force_consume(1, TokenType::Ops);
        limiter.force_consume(900, TokenType::Bytes);
        assert!(!limiter.is_blocked());
        assert_eq!(limiter.timer_remaining().unwrap(), None);
        limiter.force_consume(400, TokenType::Bytes);
        assert!(limiter.is_blocked());
        assert_eq!(limiter.bandwidth().unwrap().debt(), 300);
        let remaining = limiter.timer_remaining().unwrap().expect("timer armed");
        assert!(remaining <= Duration::from_millis(300), "{remaining:?}");
        assert!(!limiter.consume(1, TokenType::Bytes));
    }

    #[test]
    fn each_bucket_counts_its_own_tokens() {
        let mut limiter = RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(1000, 0, 60_000),
            ops: bucket(3, 0, 60_000),
        })
        .unwrap();
        for _ in 0..3 {
            assert!(limiter.consume(1, TokenType::Ops));
            assert!(limiter.consume(10, TokenType::Bytes));
        }
        assert!(!limiter.consume(1, TokenType::Ops));
        assert_eq!(limiter.bandwidth().unwrap().budget(), 970);
        assert_eq!(limiter.ops().unwrap().budget(), 0);
        limiter.manual_replenish(1, TokenType::Ops);
        assert_eq!(limiter.ops().unwrap().budget(), 1);
    }

    #[test]
    fn invalid_config_names_the_bucket_and_value() {
        let err = RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(0, 0, 100),
            ops: None,
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bandwidth") && msg.contains("size"), "{msg}");
        let err = RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(10, 0, 100),
            ops: bucket(7, 0, 0),
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("ops") && msg.contains('7'), "{msg}");
    }

    fn both(size: u64, burst: u64) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: bucket(size, burst, 60_000),
            ops: bucket(10, 0, 60_000),
        }
    }

    #[test]
    fn saved_levels_come_back_in_a_new_limiter_through_serde() {
        let mut old = RateLimiter::new(&both(1000, 300)).unwrap();
        assert!(old.consume(500, TokenType::Bytes)); // the burst, then 200
        assert!(old.consume(4, TokenType::Ops));
        let saved = old.save_state();
        assert_eq!(
            saved.bandwidth,
            Some(TokenBucketState {
                budget: 800,
                one_time_burst: 0,
                debt: 0
            })
        );
        let bytes = postcard::to_stdvec(&saved).unwrap();
        let back: RateLimiterState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, saved);

        let mut new = RateLimiter::new(&both(1000, 300)).unwrap();
        new.restore_state(&back).unwrap();
        let bandwidth = new.bandwidth().unwrap();
        assert_eq!((bandwidth.budget(), bandwidth.one_time_burst()), (800, 0));
        assert_eq!(new.ops().unwrap().budget(), 6);
        // The restored levels limit: 6 more requests, not 10.
        for _ in 0..6 {
            assert!(new.consume(1, TokenType::Ops));
        }
        assert!(!new.consume(1, TokenType::Ops));
    }

    #[test]
    fn a_saved_debt_blocks_the_restored_limiter() {
        let config = RateLimiterConfig {
            bandwidth: bucket(1000, 0, 60_000),
            ops: None,
        };
        let mut old = RateLimiter::new(&config).unwrap();
        old.force_consume(1500, TokenType::Bytes);
        let saved = old.save_state();
        assert_eq!(saved.bandwidth.map(|b| (b.budget, b.debt)), Some((0, 500)));
        let mut new = RateLimiter::new(&config).unwrap();
        new.restore_state(&saved).unwrap();
        assert_eq!(new.bandwidth().unwrap().debt(), 500);
        // Blocked at once, as the saved one was, with the timer set for the repayment
        // (500 tokens at 1000 per minute: 30 s).
        assert!(new.is_blocked());
        let remaining = new.timer_remaining().unwrap().unwrap();
        assert!(
            remaining > Duration::from_secs(25) && remaining <= Duration::from_secs(30),
            "{remaining:?}"
        );
        assert!(!new.consume(1, TokenType::Bytes));
    }

    #[test]
    fn saved_states_the_limiter_cannot_hold_are_refused_and_change_nothing() {
        let mut limiter = RateLimiter::new(&both(1000, 300)).unwrap();
        let good = limiter.save_state();
        let full = |l: &RateLimiter| {
            let b = l.bandwidth().unwrap();
            (b.budget(), b.one_time_burst(), l.ops().unwrap().budget())
        };
        let before = full(&limiter);
        let level = |budget, one_time_burst, debt| TokenBucketState {
            budget,
            one_time_burst,
            debt,
        };
        let cases = [
            // Empty bandwidth levels are fine; the ops budget is not: nothing applied.
            (
                RateLimiterState {
                    bandwidth: Some(level(0, 0, 0)),
                    ops: Some(level(11, 0, 0)),
                },
                ["ops", "budget", "11", "10"].as_slice(),
            ),
            (
                RateLimiterState {
                    bandwidth: Some(level(10, 301, 0)),
                    ..good
                },
                ["bandwidth", "one-time burst", "301", "300"].as_slice(),
            ),
            (
                RateLimiterState {
                    bandwidth: Some(level(10, 0, 5)),
                    ..good
                },
                ["bandwidth", "debt", "5"].as_slice(),
            ),
            (
                RateLimiterState {
                    bandwidth: None,
                    ..good
                },
                ["no levels for the limiter's bandwidth bucket"].as_slice(),
            ),
        ];
        for (state, words) in cases {
            let err = limiter.restore_state(&state).unwrap_err().to_string();
            for word in words {
                assert!(err.contains(word), "{state:?}: {err:?} lacks {word:?}");
            }
            assert_eq!(full(&limiter), before, "{state:?} changed the limiter");
        }
        let mut unlimited = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        let err = unlimited.restore_state(&good).unwrap_err().to_string();
        assert!(
            err.contains("bandwidth bucket levels but the limiter has no bandwidth bucket"),
            "{err}"
        );
        unlimited
            .restore_state(&RateLimiterState::default())
            .unwrap();
    }
}
