//! Exponential backoff with "equal jitter" (half of each wait fixed, half random, so
//! clients that failed together do not retry together), and `Retry-After` parsing. Used by
//! the master's step retries, the worker's result delivery and the gateway's upstream
//! retries; the master's Lua (`report.lua`) computes the same formula.

use std::time::Duration;

use http::HeaderMap;
use http::header::RETRY_AFTER;

/// Exponential backoff from `base`, doubling per retry, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait (before jitter).
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `retry + 1` (`retry` from 0) for a `jitter` in `[0, 1]`:
    /// `min(max, base · 2^retry)`, half of it fixed and half scaled by `jitter`.
    pub fn delay_with(&self, retry: u32, jitter: f64) -> Duration {
        let full = self
            .base
            .saturating_mul(1u32 << retry.min(30))
            .min(self.max);
        let half = full / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// [`Self::delay_with`] with a random jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, rand::random())
    }
}

/// A `Retry-After` given in (possibly fractional) seconds. The HTTP-date form is not used
/// by the services Ensemble talks to and reads as absent.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_half_fixed() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        assert_eq!(b.delay_with(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay_with(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay_with(2, 0.5), Duration::from_millis(300));
        assert_eq!(b.delay_with(10, 1.0), Duration::from_millis(1000));
        assert_eq!(b.delay_with(u32::MAX, 0.0), Duration::from_millis(500));
        for retry in 0..8 {
            let d = b.delay(retry);
            assert!(d <= Duration::from_millis(1000), "{d:?}");
        }
    }

    #[test]
    fn retry_after_reads_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(RETRY_AFTER, "0.5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, "-1".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
