//! Flood control: a token bucket per client.
//!
//! Each line a client sends takes a token; tokens come back at `--flood-rate` per second up to
//! `--flood-burst`. A person typing or pasting a paragraph stays within it; a script flooding
//! the room has its excess lines dropped before they cost anyone else anything. The sender is
//! warned once per burst, not once per dropped line, which would be a flood of its own: the
//! warning is armed again only when the client has been quiet long enough to refill its bucket.

use std::time::Instant;

use crate::config::FloodLimit;

/// One client's allowance.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f32,
    last_refill: Instant,
    warned: bool,
}

/// Whether a line may go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Dropped; `warn` is true for the first line dropped in this burst.
    Dropped {
        warn: bool,
    },
}

impl TokenBucket {
    /// A full bucket: a new client may send a whole burst at once.
    pub fn full(limit: FloodLimit, now: Instant) -> Self {
        TokenBucket {
            tokens: limit.burst as f32,
            last_refill: now,
            warned: false,
        }
    }

    /// Takes a token for one line if there is one.
    pub fn take(&mut self, limit: FloodLimit, now: Instant) -> Verdict {
        let burst = limit.burst as f32;
        let elapsed = now
            .saturating_duration_since(self.last_refill)
            .as_secs_f32();
        self.tokens = (self.tokens + elapsed * limit.lines_per_sec as f32).min(burst);
        self.last_refill = now;
        if self.tokens >= burst {
            self.warned = false;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allowed;
        }
        let warn = !self.warned;
        self.warned = true;
        Verdict::Dropped { warn }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMIT: FloodLimit = FloodLimit {
        lines_per_sec: 20,
        burst: 40,
    };

    fn count(bucket: &mut TokenBucket, lines: usize, now: Instant) -> (usize, usize) {
        let (mut allowed, mut warnings) = (0, 0);
        for _ in 0..lines {
            match bucket.take(LIMIT, now) {
                Verdict::Allowed => allowed += 1,
                Verdict::Dropped { warn: true } => warnings += 1,
                Verdict::Dropped { warn: false } => {}
            }
        }
        (allowed, warnings)
    }

    #[test]
    fn a_burst_passes_then_the_rate_applies_with_one_warning() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        assert_eq!(count(&mut bucket, 100, start), (40, 1));
        // Half a second later: 10 more tokens, and no second warning for the same burst.
        let later = start + Duration::from_millis(500);
        assert_eq!(count(&mut bucket, 100, later), (10, 0));
    }

    #[test]
    fn the_warning_is_armed_again_once_the_bucket_has_refilled() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        assert_eq!(count(&mut bucket, 41, start), (40, 1));
        let rested = start + Duration::from_secs(2);
        assert_eq!(count(&mut bucket, 41, rested), (40, 1));
    }

    #[test]
    fn a_steady_sender_within_the_rate_is_never_dropped() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(LIMIT, start);
        for n in 0..1000 {
            let now = start + Duration::from_millis(50 * n);
            assert_eq!(bucket.take(LIMIT, now), Verdict::Allowed, "line {n}");
        }
    }
}
