//! Flood control: a token bucket per client, and reading more slowly instead of dropping.
//!
//! Each line a client sends takes a token; tokens come back at `--flood-rate` per second up to
//! `--flood-burst`. A person typing or pasting a paragraph stays within it. A client with no
//! tokens left is simply not read until it has earned some back (what IRC servers call fake
//! lag): its lines wait in the kernel's buffers and, once those are full, its own writes block.
//! Nothing is dropped, order is kept, the server holds at most one read of its input, and only
//! the flooder is slowed. It is told once per burst, not once per delayed line: the notice is
//! armed again only when the client has been quiet long enough to refill its bucket.

use std::time::{Duration, Instant};

use crate::config::FloodLimit;

/// Fractions of a token lost to floating-point rounding.
const TOKEN_ROUNDING: f64 = 1e-6;

/// One client's allowance.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    last_refill: Instant,
    /// Already told it is being slowed down in this burst.
    warned: bool,
}

impl TokenBucket {
    /// A full bucket: a new client may send a whole burst at once.
    pub fn full(limit: FloodLimit, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(limit.burst),
            last_refill: now,
            warned: false,
        }
    }

    /// Whole lines the client may send at `now`.
    pub fn available(&mut self, limit: FloodLimit, now: Instant) -> u32 {
        let burst = f64::from(limit.burst);
        let elapsed = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(limit.lines_per_sec)).min(burst);
        self.last_refill = now;
        if self.tokens >= burst {
            self.warned = false;
        }
        // The margin absorbs rounding, so a client woken at `refilled_at` finds its lines there.
        (self.tokens + TOKEN_ROUNDING) as u32
    }

    /// Charges one line; callers first ask `available`.
    pub fn spend(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// When the client will have earned `resume_lines` lines again, counted from the last
    /// `available` call.
    pub fn refilled_at(&self, limit: FloodLimit) -> Instant {
        let missing = (f64::from(resume_lines(limit)) - self.tokens).max(0.0);
        self.last_refill + Duration::from_secs_f64(missing / f64::from(limit.lines_per_sec))
    }

    /// True the first time in a burst that the client's lines had to wait.
    pub fn first_delay_in_burst(&mut self) -> bool {
        !std::mem::replace(&mut self.warned, true)
    }
}

/// Lines a delayed client must have earned before it is read again: a tenth of a second's worth
/// (at least one, at most a burst). Reading one line at a time would wake the loop, and copy to
/// every recipient, once per line; this keeps the rate exact at a tenth of the wakeups.
pub fn resume_lines(limit: FloodLimit) -> u32 {
    (limit.lines_per_sec / 10).clamp(1, limit.burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: FloodLimit = FloodLimit {
        lines_per_sec: 20,
        burst: 40,
    };

    /// Sends up to `lines` at `now`, as the loop does: only what is available.
    fn send(bucket: &mut TokenBucket, lines: u32, now: Instant) -> u32 {
        let allowed = bucket.available(LIMIT, now).min(lines);
        for _ in 0..allowed {
            bucket.spend();
        }
        allowed
    }

    #[test]
    fn a_burst_passes_then_the_rate_applies() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        assert_eq!(send(&mut bucket, 100, start), 40);
        assert_eq!(
            send(&mut bucket, 100, start + Duration::from_millis(500)),
            10
        );
    }

    #[test]
    fn a_delayed_client_is_read_again_when_it_has_earned_a_tenth_of_a_second() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        send(&mut bucket, 100, start);
        assert_eq!(resume_lines(LIMIT), 2);
        let resume = bucket.refilled_at(LIMIT);
        let wait = resume - start;
        assert!(
            wait >= Duration::from_millis(99) && wait <= Duration::from_millis(101),
            "{wait:?}"
        );
        assert_eq!(send(&mut bucket, 100, resume), 2);
        let slow = FloodLimit {
            lines_per_sec: 1,
            burst: 5,
        };
        assert_eq!(resume_lines(slow), 1, "at least one line");
    }

    #[test]
    fn the_notice_is_given_once_per_burst_and_armed_again_once_refilled() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        send(&mut bucket, 41, start);
        assert!(bucket.first_delay_in_burst());
        assert!(!bucket.first_delay_in_burst());
        send(&mut bucket, 1, start + Duration::from_millis(500));
        assert!(!bucket.first_delay_in_burst(), "same burst");
        send(&mut bucket, 41, start + Duration::from_secs(3));
        assert!(
            bucket.first_delay_in_burst(),
            "the bucket refilled in between"
        );
    }

    #[test]
    fn a_steady_sender_within_the_rate_is_never_delayed() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        for n in 0..1000 {
            let now = start + Duration::from_millis(50 * n);
            assert_eq!(send(&mut bucket, 1, now), 1, "line {n}");
        }
    }
}
