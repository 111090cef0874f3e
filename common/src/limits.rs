//! Process limits every service sets at start.
//!
//! The one that matters is the open-file limit (`RLIMIT_NOFILE`): every connection a
//! service holds (a client's long poll, a worker's result POST, a Redis connection) is a
//! file descriptor. Many systems start processes with a soft limit of 1024 although the
//! hard limit is far higher; a master holding 1,500 long polls then fails `accept` with
//! "Too many open files" and stops answering even `/health`. Each binary therefore raises
//! its soft limit to the hard limit before it listens, and logs both.

/// The open-file limits of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimits {
    /// The soft limit at start, before [`raise_nofile`] touched it.
    pub before: u64,
    /// The soft limit in effect now: the most descriptors this process may hold.
    pub soft: u64,
    /// The hard limit: the most the soft limit may be raised to without privileges.
    pub hard: u64,
}

/// Where to stop when the hard limit is "unlimited": Linux refuses a soft limit above
/// `fs.nr_open`, whose default is 2^20.
const UNLIMITED_FALLBACK: u64 = 1 << 20;

/// The open-file limits now, or `None` where they cannot be read (not Unix).
pub fn nofile() -> Option<NofileLimits> {
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    Some(NofileLimits {
        before: soft,
        soft,
        hard,
    })
}

/// Raises the soft open-file limit to the hard limit and logs both. Never fails: a
/// service that cannot raise it still starts, with a warning naming the limit it keeps.
/// Returns the limits in effect (`None` where they cannot be read).
pub fn raise_nofile() -> Option<NofileLimits> {
    let Some(start) = nofile() else {
        tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE); leaving it as it is");
        return None;
    };
    let raised = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::increase_nofile_limit(UNLIMITED_FALLBACK));
    let limits = NofileLimits {
        before: start.soft,
        soft: nofile().map_or(start.soft, |now| now.soft),
        hard: start.hard,
    };
    match raised {
        Ok(_) => tracing::info!(
            soft = limits.soft,
            hard = limits.hard,
            soft_at_start = limits.before,
            "open-file limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            soft = limits.soft,
            hard = limits.hard,
            "could not raise the soft open-file limit (RLIMIT_NOFILE) to the hard limit; \
             connections beyond the soft limit will be refused"
        ),
    }
    Some(limits)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit_and_is_idempotent() {
        let first = raise_nofile().expect("unix has RLIMIT_NOFILE");
        assert!(first.soft >= first.before);
        assert!(first.soft <= first.hard);
        if first.hard <= UNLIMITED_FALLBACK {
            assert_eq!(
                first.soft, first.hard,
                "the soft limit is raised to the hard one"
            );
        }
        let again = raise_nofile().unwrap();
        assert_eq!(again.before, first.soft);
        assert_eq!(again.soft, first.soft);
        assert_eq!(nofile().unwrap().soft, first.soft);
    }
}
