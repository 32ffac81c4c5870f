//! Logging setup shared by the binaries: tracing to stderr at a level given on the command line;
//! and, on the host, a rate limit for lines that outsiders can cause.

/// Logs at `level` (or what `RUST_LOG` says) to stderr.
pub fn init(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(feature = "host")]
pub(crate) use limiter::LogLimiter;

/// Rate limits for log lines that outsiders can cause (refused connections), host side only.
#[cfg(feature = "host")]
mod limiter {
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// Keys a limiter remembers at once; beyond it, events of new keys are counted nowhere and not logged.
    const MAX_KEYS: usize = 1024;

    /// Lets one log line per key (a peer's uid or address) through per interval, so that a flood of
    /// refused connections writes a line a minute rather than a line each. The line that gets through
    /// says how many were left out since the previous one.
    pub(crate) struct LogLimiter<K> {
        interval: Duration,
        windows: Mutex<HashMap<K, Window>>,
    }

    struct Window {
        started: Instant,
        suppressed: u64,
    }

    impl<K: Eq + Hash + Copy> LogLimiter<K> {
        pub(crate) fn new(interval: Duration) -> Self {
            LogLimiter {
                interval,
                windows: Mutex::new(HashMap::new()),
            }
        }

        /// `Some(n)` when this event of `key` should be logged, `n` being the events of `key` left out
        /// since its last line; `None` when it is only counted.
        pub(crate) fn admit(&self, key: K) -> Option<u64> {
            self.admit_at(key, Instant::now())
        }

        fn admit_at(&self, key: K, now: Instant) -> Option<u64> {
            let mut windows = self
                .windows
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(window) = windows.get_mut(&key) {
                if now.saturating_duration_since(window.started) < self.interval {
                    window.suppressed += 1;
                    return None;
                }
                let suppressed = window.suppressed;
                *window = Window {
                    started: now,
                    suppressed: 0,
                };
                return Some(suppressed);
            }
            if windows.len() >= MAX_KEYS {
                let interval = self.interval;
                windows
                    .retain(|_, window| now.saturating_duration_since(window.started) < interval);
            }
            if windows.len() >= MAX_KEYS {
                // A flood from ever new keys: stay quiet rather than grow.
                return None;
            }
            windows.insert(
                key,
                Window {
                    started: now,
                    suppressed: 0,
                },
            );
            Some(0)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn one_line_per_key_and_interval_with_the_count_of_the_rest() {
            let limiter = LogLimiter::new(Duration::from_secs(60));
            let start = Instant::now();
            assert_eq!(limiter.admit_at(65534u32, start), Some(0));
            for i in 1..=1500 {
                let at = start + Duration::from_millis(i * 10);
                assert_eq!(limiter.admit_at(65534, at), None, "event {i}");
            }
            // Another key has its own window.
            assert_eq!(
                limiter.admit_at(1000, start + Duration::from_secs(1)),
                Some(0)
            );
            assert_eq!(
                limiter.admit_at(65534, start + Duration::from_secs(60)),
                Some(1500)
            );
            assert_eq!(
                limiter.admit_at(65534, start + Duration::from_secs(61)),
                None
            );
            assert_eq!(
                limiter.admit_at(65534, start + Duration::from_secs(125)),
                Some(1)
            );
        }

        #[test]
        fn a_flood_of_new_keys_stays_bounded() {
            let limiter = LogLimiter::new(Duration::from_secs(60));
            let start = Instant::now();
            let logged = (0..5000u32)
                .filter(|key| limiter.admit_at(*key, start).is_some())
                .count();
            assert_eq!(logged, MAX_KEYS);
            // Once the windows have passed, new keys are logged again.
            assert_eq!(
                limiter.admit_at(99_999, start + Duration::from_secs(60)),
                Some(0)
            );
        }
    }
}
