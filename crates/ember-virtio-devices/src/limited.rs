//! Serving a queue through a [`RateLimiter`], shared by virtio-blk, virtio-net tx and
//! virtio-rng: each request is charged once done ([`charge_done`]), the drain stops as
//! soon as the limiter blocks (the chains left wait in the ring) or the worker is asked
//! to stop, and the limiter's timerfd, one of the worker's backend fds, brings the
//! worker back ([`handle_timer`]). A paused device's limiters' levels go into and
//! come back from a snapshot with [`save_limiters`] and [`restore_limiters`].

use std::sync::atomic::{AtomicBool, Ordering};

use ember_rate_limiter::{
    error_limited, RateLimiter, RateLimiterError, RateLimiterState, TokenType,
};
use ember_virtio::worker::{drain_queue_until, WorkerContext, QUEUE_BUDGET};
use virtio_queue::DescriptorChain;
use vm_memory::GuestAddressSpace;

/// Charges a request already done to `limiter`: one op and `bytes` bytes. It never
/// refuses: what a bucket lacks becomes a debt, and the limiter blocks until it is
/// repaid.
pub(crate) fn charge_done(limiter: &mut RateLimiter, bytes: u64) {
    limiter.force_consume(1, TokenType::Ops);
    limiter.force_consume(bytes, TokenType::Bytes);
}

/// The levels of a device's limiters, one per slot (`None`: a slot that limits
/// nothing, saved as [`RateLimiterState::default`]).
pub(crate) fn save_limiters<const N: usize>(
    limiters: [Option<&mut RateLimiter>; N],
) -> Vec<RateLimiterState> {
    limiters
        .into_iter()
        .map(|limiter| limiter.map(RateLimiter::save_state).unwrap_or_default())
        .collect()
}

/// Restores the levels `states` into a device's limiter slots, all or none: every
/// state is checked before any is applied.
pub(crate) fn restore_limiters<const N: usize>(
    mut limiters: [Option<&mut RateLimiter>; N],
    states: &[RateLimiterState],
) -> Result<(), RateLimiterError> {
    if states.len() != N {
        return Err(RateLimiterError::StateCount {
            expected: N,
            got: states.len(),
        });
    }
    for (limiter, state) in limiters.iter().zip(states) {
        match limiter {
            Some(limiter) => limiter.check_state(state)?,
            None if state.is_unlimited() => {}
            None => {
                return Err(RateLimiterError::StateBucketMismatch {
                    token_type: match state.bandwidth {
                        Some(_) => TokenType::Bytes,
                        None => TokenType::Ops,
                    },
                    saved: true,
                })
            }
        }
    }
    for (limiter, state) in limiters.iter_mut().zip(states) {
        if let Some(limiter) = limiter {
            limiter.restore_state(state)?;
        }
    }
    Ok(())
}

/// The limiter's timer fired (or its fd is otherwise readable): unblock it. A spurious
/// wake-up is harmless.
pub(crate) fn handle_timer(limiter: &mut RateLimiter, device: &str) {
    match limiter.event_handler() {
        Ok(()) | Err(RateLimiterError::SpuriousEvent) => {}
        Err(e) => error_limited!("{device}: rate limiter: {e}"),
    }
}

/// Drains `queue` with the worker's own loop (`drain_queue_until`: its budget, its
/// anti-spin guard), handing each chain to `handle`, which returns the used length and
/// the bytes to charge. Stops when the limiter blocks or the worker is stopping (checked
/// after each request, as `process_queue` does), then signals the used buffers and, if
/// the budget ran out with the limiter still open, comes back after the other events.
pub(crate) fn serve_limited<M, F>(
    ctx: &mut WorkerContext<M>,
    queue: usize,
    limiter: &mut RateLimiter,
    mut handle: F,
) where
    M: GuestAddressSpace,
    F: FnMut(&M::M, DescriptorChain<&M::M>) -> (u32, u64),
{
    if limiter.is_blocked() {
        // The limiter's timer brings the worker back; the chains wait in the ring.
        return;
    }
    // `drain_queue_until` stops on one flag: set it when the limiter blocks or the
    // worker is asked to stop.
    let worker_stop = ctx.stop_flag();
    let stop = AtomicBool::new(worker_stop.load(Ordering::Relaxed));
    let mem = ctx.memory();
    let Some(q) = ctx.queue_mut(queue) else {
        return;
    };
    let drained = drain_queue_until(&*mem, q, QUEUE_BUDGET, &stop, |chain| {
        let (used_len, bytes) = handle(&mem, chain);
        charge_done(limiter, bytes);
        if limiter.is_blocked() || worker_stop.load(Ordering::Relaxed) {
            stop.store(true, Ordering::Relaxed);
        }
        used_len
    });
    if drained.handled > 0 {
        ctx.signal_used(&mem, queue);
    }
    // Budget spent with the limiter still open: come back after the other events.
    if drained.more && !limiter.is_blocked() && !ctx.stopping() {
        ctx.kick(queue);
    }
}
