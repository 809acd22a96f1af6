//! One token bucket: [`TokenBucket`] and its settings, [`TokenBucketConfig`].

use std::time::{Duration, Instant};

use crate::state::TokenBucketState;
use crate::RateLimiterError;

/// The longest refill time a bucket accepts: 2^32 ms, about 49 days. It keeps every
/// computation on the bucket inside 128-bit integers.
pub const MAX_REFILL_TIME_MS: u64 = 1 << 32;

const NANOS_PER_MS: u128 = 1_000_000;

/// One token bucket's settings (the shape of Firecracker's `TokenBucket` and Cloud
/// Hypervisor's `bw_*`/`ops_*` keys).
///
/// The bucket holds at most `size` tokens and refills from empty to full in
/// `refill_time_ms`, so its steady rate is `size / refill_time_ms` tokens per
/// millisecond. `one_time_burst` extra tokens are available once, at the start, and
/// never come back.
///
/// ```
/// use ember_rate_limiter::TokenBucketConfig;
///
/// // 1 MiB/s steady, bursts of up to 1 MiB, plus 8 MiB once.
/// let config = TokenBucketConfig { size: 1 << 20, one_time_burst: 8 << 20, refill_time_ms: 1000 };
/// assert_eq!(config.rate_per_sec(), 1048576.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TokenBucketConfig {
    /// The bucket's capacity in tokens (bytes or operations); must be > 0.
    pub size: u64,
    /// Tokens available once, before the bucket's own, that never refill.
    pub one_time_burst: u64,
    /// Milliseconds for an empty bucket to refill completely; must be 1 to
    /// [`MAX_REFILL_TIME_MS`].
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// The steady rate in tokens per second (0 for an invalid config with no refill
    /// time).
    ///
    /// ```
    /// use ember_rate_limiter::TokenBucketConfig;
    ///
    /// let config = TokenBucketConfig { size: 500, one_time_burst: 0, refill_time_ms: 100 };
    /// assert_eq!(config.rate_per_sec(), 5000.0);
    /// ```
    pub fn rate_per_sec(&self) -> f64 {
        if self.refill_time_ms == 0 {
            return 0.0;
        }
        self.size as f64 * 1000.0 / self.refill_time_ms as f64
    }

    /// Checks the settings: `size` > 0 and `refill_time_ms` in 1..=[`MAX_REFILL_TIME_MS`].
    ///
    /// ```
    /// use ember_rate_limiter::{RateLimiterError, TokenBucketConfig};
    ///
    /// let config = TokenBucketConfig { size: 0, one_time_burst: 0, refill_time_ms: 100 };
    /// assert!(matches!(config.validate(), Err(RateLimiterError::ZeroSize { refill_time_ms: 100 })));
    /// ```
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        if self.size == 0 {
            return Err(RateLimiterError::ZeroSize {
                refill_time_ms: self.refill_time_ms,
            });
        }
        if self.refill_time_ms == 0 {
            return Err(RateLimiterError::ZeroRefillTime { size: self.size });
        }
        if self.refill_time_ms > MAX_REFILL_TIME_MS {
            return Err(RateLimiterError::RefillTimeTooLong {
                refill_time_ms: self.refill_time_ms,
            });
        }
        Ok(())
    }
}

/// What [`TokenBucket::reduce`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BucketReduction {
    /// Not enough tokens: nothing was taken; try again later
    /// ([`TokenBucket::time_until_available`] says when).
    Failure,
    /// The tokens were taken.
    Success,
    /// The request was larger than the bucket could ever hold and was allowed anyway;
    /// the bucket is now in debt, and gives no tokens until the debt is repaid. The
    /// value is the debt in bucket sizes: the wait in refill times.
    OverConsumption(f64),
}

/// A token bucket with a one-time burst, refilled continuously at `size` tokens per
/// `refill_time_ms`, like Firecracker's.
///
/// * The one-time burst is spent first and never refills.
/// * A request that fits in the tokens available (burst plus budget) is taken whole;
///   one that does not fit but is no larger than the bucket fails and takes nothing.
/// * A request larger than the bucket size could never fit, so it is allowed at once as
///   *over-consumption*: the bucket empties and goes into debt for the rest, which the
///   refill repays before any new tokens count. Huge requests cannot deadlock, and the
///   long-run rate still holds.
///
/// Refill is computed from elapsed time on each call (no timer here; see
/// [`RateLimiter`](crate::RateLimiter) for the wake-up).
///
/// ```
/// use ember_rate_limiter::{BucketReduction, TokenBucket, TokenBucketConfig};
///
/// let mut bucket = TokenBucket::new(TokenBucketConfig {
///     size: 1000,
///     one_time_burst: 200,
///     refill_time_ms: 1000,
/// })?;
/// assert_eq!(bucket.reduce(1100), BucketReduction::Success); // burst first, then budget
/// assert_eq!(bucket.one_time_burst(), 0);
/// assert_eq!(bucket.reduce(500), BucketReduction::Failure); // ~100 left
/// assert!(matches!(bucket.reduce(3000), BucketReduction::OverConsumption(_)));
/// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
/// ```
#[derive(Clone, Debug)]
pub struct TokenBucket {
    config: TokenBucketConfig,
    /// Burst tokens left.
    one_time_burst: u64,
    /// Tokens in the bucket, at most `config.size`.
    budget: u64,
    /// Tokens owed from an over-consumption; refill repays them before `budget` grows.
    debt: u64,
    /// The refill is counted from here.
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket with its whole one-time burst, or an error naming the bad value.
    ///
    /// ```
    /// use ember_rate_limiter::{TokenBucket, TokenBucketConfig};
    ///
    /// let bucket = TokenBucket::new(TokenBucketConfig { size: 64, one_time_burst: 0, refill_time_ms: 10 })?;
    /// assert_eq!(bucket.budget(), 64);
    /// assert!(TokenBucket::new(TokenBucketConfig { size: 64, one_time_burst: 0, refill_time_ms: 0 }).is_err());
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn new(config: TokenBucketConfig) -> Result<Self, RateLimiterError> {
        Self::new_at(config, Instant::now())
    }

    pub(crate) fn new_at(
        config: TokenBucketConfig,
        now: Instant,
    ) -> Result<Self, RateLimiterError> {
        config.validate()?;
        Ok(TokenBucket {
            config,
            one_time_burst: config.one_time_burst,
            budget: config.size,
            debt: 0,
            last_update: now,
        })
    }

    /// The settings this bucket was made with.
    pub fn config(&self) -> TokenBucketConfig {
        self.config
    }

    /// The bucket's capacity.
    pub fn capacity(&self) -> u64 {
        self.config.size
    }

    /// Tokens in the bucket as of its last update (the last [`reduce`](Self::reduce) or
    /// replenish); refill since then is not counted.
    ///
    /// ```
    /// use ember_rate_limiter::{TokenBucket, TokenBucketConfig};
    ///
    /// let mut bucket = TokenBucket::new(TokenBucketConfig { size: 100, one_time_burst: 0, refill_time_ms: 1000 })?;
    /// bucket.reduce(60);
    /// assert!(bucket.budget() >= 40);
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// One-time burst tokens left.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Tokens owed after an over-consumption, as of the last update.
    pub fn debt(&self) -> u64 {
        self.debt
    }

    /// The bucket's levels now (refill up to now included), for a snapshot.
    ///
    /// ```
    /// use ember_rate_limiter::{TokenBucket, TokenBucketConfig};
    ///
    /// let config = TokenBucketConfig { size: 100, one_time_burst: 50, refill_time_ms: 60_000 };
    /// let mut bucket = TokenBucket::new(config)?;
    /// bucket.reduce(80); // the whole burst, then 30 of the budget
    /// let saved = bucket.save_state();
    /// assert_eq!((saved.one_time_burst, saved.budget), (0, 70));
    ///
    /// let mut restored = TokenBucket::new(config)?; // full, with its burst
    /// restored.restore_state(&saved)?;
    /// assert_eq!((restored.one_time_burst(), restored.budget()), (0, 70));
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn save_state(&mut self) -> TokenBucketState {
        self.replenish_at(Instant::now());
        TokenBucketState {
            budget: self.budget,
            one_time_burst: self.one_time_burst,
            debt: self.debt,
        }
    }

    /// Sets the bucket's levels to `state` (saved by [`save_state`](Self::save_state)
    /// from a bucket with the same settings); refill counts from now. A state this
    /// bucket's settings cannot hold (a budget above its size, a burst above its
    /// configured burst, a debt beside a non-empty bucket) is refused with
    /// [`RateLimiterError::StateOutOfRange`], and the bucket is left as it was.
    ///
    /// ```
    /// use ember_rate_limiter::{TokenBucket, TokenBucketConfig, TokenBucketState};
    ///
    /// let mut bucket = TokenBucket::new(TokenBucketConfig { size: 100, one_time_burst: 0, refill_time_ms: 1000 })?;
    /// let too_much = TokenBucketState { budget: 101, one_time_burst: 0, debt: 0 };
    /// assert!(bucket.restore_state(&too_much).is_err());
    /// assert_eq!(bucket.budget(), 100);
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn restore_state(&mut self, state: &TokenBucketState) -> Result<(), RateLimiterError> {
        self.check_state(state)?;
        self.budget = state.budget;
        self.one_time_burst = state.one_time_burst;
        self.debt = state.debt;
        self.last_update = Instant::now();
        Ok(())
    }

    /// Refuses a saved state this bucket's settings cannot hold.
    pub(crate) fn check_state(&self, state: &TokenBucketState) -> Result<(), RateLimiterError> {
        let out_of_range = |field, value, max| {
            if value > max {
                Err(RateLimiterError::StateOutOfRange { field, value, max })
            } else {
                Ok(())
            }
        };
        out_of_range("budget", state.budget, self.config.size)?;
        out_of_range(
            "one-time burst",
            state.one_time_burst,
            self.config.one_time_burst,
        )?;
        // A debt arises only once the bucket is empty and is repaid before it refills.
        if state.budget > 0 {
            out_of_range("debt", state.debt, 0)?;
        }
        Ok(())
    }

    /// Takes `tokens`, from the one-time burst first and then the bucket.
    ///
    /// See the [type's documentation](TokenBucket) for the three outcomes.
    ///
    /// ```
    /// use ember_rate_limiter::{BucketReduction, TokenBucket, TokenBucketConfig};
    ///
    /// let mut bucket = TokenBucket::new(TokenBucketConfig { size: 10, one_time_burst: 0, refill_time_ms: 60_000 })?;
    /// assert_eq!(bucket.reduce(10), BucketReduction::Success);
    /// assert_eq!(bucket.reduce(10), BucketReduction::Failure);
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn reduce(&mut self, tokens: u64) -> BucketReduction {
        self.reduce_at(tokens, Instant::now())
    }

    pub(crate) fn reduce_at(&mut self, tokens: u64, now: Instant) -> BucketReduction {
        self.replenish_at(now);
        if tokens <= self.one_time_burst {
            self.one_time_burst -= tokens;
            return BucketReduction::Success;
        }
        let rest = tokens - self.one_time_burst;
        if self.debt == 0 && rest <= self.budget {
            self.one_time_burst = 0;
            self.budget -= rest;
            return BucketReduction::Success;
        }
        if rest > self.config.size {
            // Could never fit: allow it, and owe what the bucket does not hold.
            return self.go_into_debt(rest);
        }
        BucketReduction::Failure
    }

    /// Takes `tokens` whether or not the bucket has them, for work already done (a frame
    /// already received): what the burst and the bucket do not hold becomes a debt,
    /// repaid before new tokens count. Never [`BucketReduction::Failure`].
    ///
    /// ```
    /// use ember_rate_limiter::{BucketReduction, TokenBucket, TokenBucketConfig};
    ///
    /// let mut bucket = TokenBucket::new(TokenBucketConfig { size: 100, one_time_burst: 0, refill_time_ms: 60_000 })?;
    /// assert_eq!(bucket.force_reduce(60), BucketReduction::Success);
    /// assert!(matches!(bucket.force_reduce(60), BucketReduction::OverConsumption(_)));
    /// assert_eq!((bucket.budget(), bucket.debt()), (0, 20));
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn force_reduce(&mut self, tokens: u64) -> BucketReduction {
        self.force_reduce_at(tokens, Instant::now())
    }

    pub(crate) fn force_reduce_at(&mut self, tokens: u64, now: Instant) -> BucketReduction {
        match self.reduce_at(tokens, now) {
            BucketReduction::Failure => {
                // reduce_at took nothing, and replenished just now.
                let rest = tokens.saturating_sub(self.one_time_burst);
                self.go_into_debt(rest)
            }
            done => done,
        }
    }

    /// Spends the burst and the budget and owes the rest of `rest` (the tokens beyond
    /// the burst).
    fn go_into_debt(&mut self, rest: u64) -> BucketReduction {
        self.one_time_burst = 0;
        let owed = rest.saturating_sub(self.budget);
        self.budget = self.budget.saturating_sub(rest);
        self.debt = self.debt.saturating_add(owed);
        BucketReduction::OverConsumption(self.debt as f64 / self.config.size as f64)
    }

    /// Puts `tokens` back: into the one-time burst while it lasts (up to its initial
    /// size), else against a debt and then into the bucket (up to its size). For a
    /// device that took tokens for a request it then could not do.
    ///
    /// ```
    /// use ember_rate_limiter::{TokenBucket, TokenBucketConfig};
    ///
    /// let mut bucket = TokenBucket::new(TokenBucketConfig { size: 100, one_time_burst: 0, refill_time_ms: 60_000 })?;
    /// bucket.reduce(100);
    /// bucket.force_replenish(30);
    /// assert_eq!(bucket.budget(), 30);
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn force_replenish(&mut self, tokens: u64) {
        if self.one_time_burst > 0 {
            self.one_time_burst = self
                .one_time_burst
                .saturating_add(tokens)
                .min(self.config.one_time_burst);
            return;
        }
        let repaid = tokens.min(self.debt);
        self.debt -= repaid;
        self.budget = self
            .budget
            .saturating_add(tokens - repaid)
            .min(self.config.size);
    }

    /// How long from now until [`reduce`](Self::reduce)`(tokens)` stops failing (zero if
    /// it would succeed now). With `tokens` 0 (or larger than the bucket): until any
    /// debt is repaid.
    ///
    /// ```
    /// use std::time::Duration;
    /// use ember_rate_limiter::{TokenBucket, TokenBucketConfig};
    ///
    /// let mut bucket = TokenBucket::new(TokenBucketConfig { size: 1000, one_time_burst: 0, refill_time_ms: 1000 })?;
    /// bucket.reduce(1000);
    /// let wait = bucket.time_until_available(500);
    /// assert!(wait <= Duration::from_millis(500)); // less if time passed since the reduce
    /// # Ok::<(), ember_rate_limiter::RateLimiterError>(())
    /// ```
    pub fn time_until_available(&mut self, tokens: u64) -> Duration {
        self.time_until_available_at(tokens, Instant::now())
    }

    pub(crate) fn time_until_available_at(&mut self, tokens: u64, now: Instant) -> Duration {
        self.replenish_at(now);
        let rest = tokens
            .saturating_sub(self.one_time_burst)
            .min(self.config.size);
        let missing = u128::from(self.debt) + u128::from(rest.saturating_sub(self.budget));
        if missing == 0 {
            return Duration::ZERO;
        }
        duration_from_nanos(self.nanos_for(missing))
    }

    /// Nanoseconds of refill that produce `tokens` tokens, rounded up.
    fn nanos_for(&self, tokens: u128) -> u128 {
        // tokens < 2^65 and refill_ns < 2^52 (MAX_REFILL_TIME_MS): no overflow.
        let refill_ns = u128::from(self.config.refill_time_ms) * NANOS_PER_MS;
        (tokens * refill_ns).div_ceil(u128::from(self.config.size))
    }

    /// Adds the tokens refilled since the last update: debt first, then budget.
    fn replenish_at(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        let missing = u128::from(self.debt) + u128::from(self.config.size - self.budget);
        if missing == 0 {
            // A full bucket does not store refill for later.
            self.last_update = now;
            return;
        }
        let full_after = self.nanos_for(missing);
        if elapsed >= full_after {
            self.debt = 0;
            self.budget = self.config.size;
            self.last_update = now;
            return;
        }
        // elapsed < full_after <= ~2^117 / size, so elapsed * size fits.
        let refill_ns = u128::from(self.config.refill_time_ms) * NANOS_PER_MS;
        let tokens = elapsed * u128::from(self.config.size) / refill_ns;
        if tokens == 0 {
            return;
        }
        // tokens < missing <= 2^65: split between debt and budget.
        let tokens = u64::try_from(tokens).unwrap_or(u64::MAX);
        let repaid = tokens.min(self.debt);
        self.debt -= repaid;
        self.budget = self
            .budget
            .saturating_add(tokens - repaid)
            .min(self.config.size);
        // Advance by exactly the time those tokens took (rounded up, so never more than
        // elapsed): the fraction of a token already earned is kept for the next call.
        let used = self.nanos_for(u128::from(tokens));
        self.last_update += duration_from_nanos(used);
    }
}

fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is < 10^9.
    Duration::new(secs, (nanos % 1_000_000_000) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: u64, burst: u64, refill_time_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms,
        }
    }

    #[test]
    fn config_validation_names_the_bad_value() {
        assert!(matches!(
            cfg(0, 5, 100).validate(),
            Err(RateLimiterError::ZeroSize {
                refill_time_ms: 100
            })
        ));
        assert!(matches!(
            cfg(10, 0, 0).validate(),
            Err(RateLimiterError::ZeroRefillTime { size: 10 })
        ));
        assert!(matches!(
            cfg(10, 0, MAX_REFILL_TIME_MS + 1).validate(),
            Err(RateLimiterError::RefillTimeTooLong { .. })
        ));
        let msg = TokenBucket::new(cfg(0, 0, 100)).unwrap_err().to_string();
        assert!(msg.contains("size") && msg.contains("100"), "{msg}");
        let msg = TokenBucket::new(cfg(4096, 0, 0)).unwrap_err().to_string();
        assert!(msg.contains("refill") && msg.contains("4096"), "{msg}");
        assert!(TokenBucket::new(cfg(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS)).is_ok());
        assert!(TokenBucket::new(cfg(1, 0, 1)).is_ok());
    }

    #[test]
    fn refill_is_size_per_refill_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(1000, 0, 100), t0).unwrap();
        assert_eq!(b.reduce_at(1000, t0), BucketReduction::Success);
        assert_eq!(b.reduce_at(1, t0), BucketReduction::Failure);
        // 10 tokens per ms.
        let t = t0 + Duration::from_millis(25);
        assert_eq!(b.reduce_at(251, t), BucketReduction::Failure);
        assert_eq!(b.budget(), 250);
        assert_eq!(b.reduce_at(250, t), BucketReduction::Success);
        assert_eq!(b.budget(), 0);
        // Never beyond the size, however long it waits.
        let t = t + Duration::from_secs(3600);
        assert_eq!(b.reduce_at(0, t), BucketReduction::Success);
        assert_eq!(b.budget(), 1000);
        assert_eq!(
            b.reduce_at(1001, t),
            BucketReduction::OverConsumption(0.001)
        );
    }

    #[test]
    fn fractional_refill_is_not_lost_between_calls() {
        // 1 token per 3 ms; asking every 2 ms must still give 1 token per 3 ms (each
        // grant keeps the millisecond already earned towards the next token).
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(3, 0, 9), t0).unwrap();
        assert_eq!(b.reduce_at(3, t0), BucketReduction::Success);
        let mut got = 0;
        for ms in (2..=300).step_by(2) {
            if b.reduce_at(1, t0 + Duration::from_millis(ms)) == BucketReduction::Success {
                got += 1;
            }
        }
        assert_eq!(got, 100);
    }

    #[test]
    fn burst_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(100, 250, 1000), t0).unwrap();
        assert_eq!(b.reduce_at(200, t0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (50, 100));
        // 151 > burst + size: it can never fit, so it would be over-consumption.
        assert!(matches!(
            b.clone().reduce_at(151, t0),
            BucketReduction::OverConsumption(_)
        ));
        assert_eq!(b.reduce_at(150, t0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 0));
        let t = t0 + Duration::from_secs(100);
        assert_eq!(b.reduce_at(0, t), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
        // Total over 100 s: 250 burst + 100 size + nothing more (the bucket was full).
    }

    #[test]
    fn over_consumption_is_allowed_once_and_repaid() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(1000, 0, 1000), t0).unwrap();
        // 3500 > size: allowed, debt 2500 = 2.5 refill times.
        assert_eq!(b.reduce_at(3500, t0), BucketReduction::OverConsumption(2.5));
        assert_eq!((b.budget(), b.debt()), (0, 2500));
        assert_eq!(
            b.time_until_available_at(0, t0),
            Duration::from_millis(2500)
        );
        // While in debt, even small requests fail.
        assert_eq!(
            b.reduce_at(1, t0 + Duration::from_millis(2000)),
            BucketReduction::Failure
        );
        assert_eq!(b.debt(), 500);
        // Another huge request while in debt is allowed too, and adds to the debt.
        assert!(matches!(
            b.reduce_at(5000, t0 + Duration::from_millis(2000)),
            BucketReduction::OverConsumption(_)
        ));
        assert_eq!(b.debt(), 5500);
        let t = t0 + Duration::from_millis(2000 + 5500);
        assert_eq!(b.reduce_at(1, t), BucketReduction::Failure);
        assert_eq!((b.budget(), b.debt()), (0, 0));
        assert_eq!(
            b.reduce_at(100, t + Duration::from_millis(100)),
            BucketReduction::Success
        );
    }

    #[test]
    fn force_reduce_never_fails_and_owes_the_rest() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(1000, 100, 1000), t0).unwrap();
        assert_eq!(b.force_reduce_at(600, t0), BucketReduction::Success);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 500));
        // 800 > 500 left: 500 taken, 300 owed.
        assert_eq!(
            b.force_reduce_at(800, t0),
            BucketReduction::OverConsumption(0.3)
        );
        assert_eq!((b.budget(), b.debt()), (0, 300));
        assert_eq!(b.reduce_at(1, t0), BucketReduction::Failure);
        assert_eq!(b.time_until_available_at(0, t0), Duration::from_millis(300));
        // In debt, a forced request adds to it.
        assert!(matches!(
            b.force_reduce_at(50, t0 + Duration::from_millis(100)),
            BucketReduction::OverConsumption(_)
        ));
        assert_eq!(b.debt(), 250);
    }

    #[test]
    fn time_until_available_is_exact() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(1000, 0, 100), t0).unwrap();
        assert_eq!(b.time_until_available_at(1000, t0), Duration::ZERO);
        b.reduce_at(1000, t0);
        assert_eq!(
            b.time_until_available_at(250, t0),
            Duration::from_micros(25_000)
        );
        // Capped at the bucket size: a huge request needs a full bucket at most.
        assert_eq!(
            b.time_until_available_at(u64::MAX, t0),
            Duration::from_millis(100)
        );
        let t = t0 + Duration::from_micros(25_000);
        assert_eq!(b.time_until_available_at(250, t), Duration::ZERO);
        assert_eq!(b.reduce_at(250, t), BucketReduction::Success);
    }

    #[test]
    fn force_replenish_restores_burst_or_budget() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(100, 50, 1_000_000), t0).unwrap();
        b.reduce_at(20, t0);
        b.force_replenish(1000);
        assert_eq!((b.one_time_burst(), b.budget()), (50, 100));
        b.reduce_at(150, t0);
        b.force_replenish(1000);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
        b.reduce_at(300, t0);
        assert_eq!(b.debt(), 200);
        b.force_replenish(250);
        assert_eq!((b.debt(), b.budget()), (0, 50));
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(cfg(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS), t0).unwrap();
        assert_eq!(b.reduce_at(u64::MAX, t0), BucketReduction::Success);
        assert_eq!(b.reduce_at(u64::MAX, t0), BucketReduction::Success);
        assert_eq!(b.reduce_at(1, t0), BucketReduction::Failure);
        let far = t0 + Duration::from_secs(1 << 40);
        assert_eq!(b.reduce_at(u64::MAX, far), BucketReduction::Success);
        let mut small = TokenBucket::new_at(cfg(1, 0, MAX_REFILL_TIME_MS), t0).unwrap();
        assert!(matches!(
            small.reduce_at(u64::MAX, t0),
            BucketReduction::OverConsumption(_)
        ));
        assert!(matches!(
            small.reduce_at(u64::MAX, t0),
            BucketReduction::OverConsumption(_)
        ));
        assert_eq!(small.debt(), u64::MAX);
        assert!(small.time_until_available_at(0, t0) > Duration::from_secs(1 << 60));
        assert_eq!(small.reduce_at(1, far), BucketReduction::Failure);
    }
}
