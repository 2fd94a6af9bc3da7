//! The open-file limit: raised at start, and turned into how many clients fit.
//!
//! Every client is a file descriptor. Distributions start processes with a soft limit of 1024
//! while allowing far more (the hard limit), so the server raises its soft limit to the hard one
//! as Redis and nginx do, then caps `--max-clients` so that a full server still has descriptors
//! for everything else: it can then tell one more client "server full" instead of failing to
//! accept it at all.

use crate::warn;

/// Descriptors kept for the rest of the process: standard streams, epoll, the waker, the
/// listener, the signal thread, the database driver's connection pool and monitors (a
/// three-node Atlas cluster uses about 20), and one to refuse a client over the limit.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// Raises the soft open-file limit to the hard limit; returns the limit now in force, or `None`
/// if it cannot be read.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on some targets
    Some(limit.rlim_cur as u64)
}

/// How many clients the server can hold with `open_files` descriptors, at most `wanted`.
pub fn max_clients(wanted: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else {
        return wanted;
    };
    let fits = open_files.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    if (wanted as u64) <= fits {
        return wanted;
    }
    warn!(
        "open-file limit is {open_files}: serving at most {fits} clients instead of \
         --max-clients {wanted} (raise it with `ulimit -n` or LimitNOFILE=)"
    );
    fits as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_capped_by_the_descriptors_left_over() {
        assert_eq!(max_clients(10_000, Some(1_048_576)), 10_000);
        assert_eq!(max_clients(10_000, Some(1024)), 1024 - 64);
        assert_eq!(max_clients(10_000, Some(16)), 1, "always at least one");
        assert_eq!(max_clients(500, None), 500);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let limit = raise_open_file_limit().expect("getrlimit works");
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) };
        #[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on some targets
        let current = now.rlim_cur as u64;
        assert_eq!(current, limit);
        assert!(
            now.rlim_cur == now.rlim_max || now.rlim_max == libc::RLIM_INFINITY,
            "soft {} hard {}",
            now.rlim_cur,
            now.rlim_max
        );
    }
}
