//! Error bookkeeping shared by the plugin instance and by coordinators: the last error,
//! the error and retry counts, a bounded history of recent errors, and the file log.

use crate::clock::Clock;
use crate::error::message_of;
use crate::error_log::{sanitize_message, ErrorLog};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One recorded error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRecord {
    pub unix_ms: u64,
    pub code: i32,
    pub message: Arc<str>,
}

/// Most errors a history keeps, whatever a config asks for: the plugin's config rejects
/// more (`error_buffer_size` 0 to 1,000,000), and a coordinator's `uint32_t` field is capped
/// to it, so that no C struct can ask for 4 billion records.
pub const MAX_HISTORY: usize = 1_000_000;

struct Recent {
    last: Option<Arc<str>>,
    history: VecDeque<ErrorRecord>,
}

pub struct ErrorTracker {
    error_count: AtomicU64,
    retry_count: AtomicU64,
    history_capacity: usize,
    recent: Mutex<Recent>,
    log: Option<Arc<ErrorLog>>,
    /// A secret that must never reach a message or the log (the encryption key).
    secret: Option<String>,
}

impl ErrorTracker {
    pub fn new(
        history_capacity: usize,
        log: Option<Arc<ErrorLog>>,
        secret: Option<String>,
    ) -> Self {
        let history_capacity = history_capacity.min(MAX_HISTORY);
        ErrorTracker {
            error_count: AtomicU64::new(0),
            retry_count: AtomicU64::new(0),
            history_capacity,
            recent: Mutex::new(Recent {
                last: None,
                history: VecDeque::with_capacity(history_capacity.min(1024)),
            }),
            log,
            secret: secret.filter(|s| !s.is_empty()),
        }
    }

    /// How many recent errors the history keeps (the asked size, at most [`MAX_HISTORY`]).
    pub fn history_capacity(&self) -> usize {
        self.history_capacity
    }

    /// Starts the counts where a caller-filled structure left them.
    pub fn with_counts(self, errors: u64, retries: u64) -> Self {
        self.error_count.store(errors, Ordering::Relaxed);
        self.retry_count.store(retries, Ordering::Relaxed);
        self
    }

    /// Records an error: `None` records the code's own message.
    pub fn record(&self, clock: &dyn Clock, code: i32, message: Option<&str>) {
        let text = message.unwrap_or_else(|| message_of(code));
        let clean = sanitize_message(text);
        let message: Arc<str> = match self.redact(&clean) {
            Some(redacted) => Arc::from(redacted),
            None => Arc::from(&*clean),
        };
        let unix_ms = clock.unix_ms();
        self.error_count.fetch_add(1, Ordering::Relaxed);
        {
            let mut recent = self.recent.lock();
            if self.history_capacity > 0 {
                if recent.history.len() == self.history_capacity {
                    recent.history.pop_front();
                }
                recent.history.push_back(ErrorRecord {
                    unix_ms,
                    code,
                    message: message.clone(),
                });
            }
            recent.last = Some(message.clone());
        }
        if let Some(log) = &self.log {
            log.append(clock, unix_ms, code, &message);
        }
    }

    /// Makes `message` the last error without booking it: for the calls of ABI §4 that
    /// are not plugin-level operations (their failures name the problem, uncounted).
    pub fn set_last_error(&self, message: &str) {
        let clean = sanitize_message(message);
        let message: Arc<str> = match self.redact(&clean) {
            Some(redacted) => Arc::from(redacted),
            None => Arc::from(&*clean),
        };
        self.recent.lock().last = Some(message);
    }

    pub fn add_retries(&self, retries: u64) {
        if retries > 0 {
            self.retry_count.fetch_add(retries, Ordering::Relaxed);
        }
    }

    /// The last error's message; `None` when there is none (callers show "Success").
    pub fn last_error(&self) -> Option<Arc<str>> {
        self.recent.lock().last.clone()
    }

    /// Forgets the last error; counts and history stay (they are statistics).
    pub fn clear(&self) {
        self.recent.lock().last = None;
    }

    /// (errors recorded, retries performed).
    pub fn stats(&self) -> (u64, u64) {
        (
            self.error_count.load(Ordering::Relaxed),
            self.retry_count.load(Ordering::Relaxed),
        )
    }

    /// The most recent errors, newest first, at most `max`.
    pub fn history(&self, max: usize) -> Vec<ErrorRecord> {
        let recent = self.recent.lock();
        recent.history.iter().rev().take(max).cloned().collect()
    }

    pub fn history_len(&self) -> usize {
        self.recent.lock().history.len()
    }

    pub fn log(&self) -> Option<&Arc<ErrorLog>> {
        self.log.as_ref()
    }

    /// The text with the secret replaced, or `None` when it does not contain it.
    fn redact(&self, text: &str) -> Option<String> {
        match &self.secret {
            Some(secret) if text.contains(secret.as_str()) => {
                Some(text.replace(secret.as_str(), "[REDACTED]"))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn keeps_last_error_counts_and_bounded_history() {
        let clock = ManualClock::new(10);
        let tracker = ErrorTracker::new(3, None, None);
        assert_eq!(tracker.last_error(), None);
        for code in [-5, -6, -7, -11] {
            tracker.record(&clock, code, None);
        }
        tracker.record(&clock, -1, Some("bad path"));
        assert_eq!(tracker.last_error().as_deref(), Some("bad path"));
        assert_eq!(tracker.stats(), (5, 0));
        let history = tracker.history(10);
        let codes: Vec<i32> = history.iter().map(|r| r.code).collect();
        assert_eq!(codes, vec![-1, -11, -7]);
        assert_eq!(&*history[1].message, "Connection lost");
        tracker.clear();
        assert_eq!(tracker.last_error(), None);
        assert_eq!(tracker.stats(), (5, 0));
    }

    #[test]
    fn the_secret_never_reaches_a_message() {
        let clock = ManualClock::new(10);
        let tracker = ErrorTracker::new(10, None, Some("hunter2".into()));
        tracker.record(&clock, -8, Some("decrypt with key hunter2 failed"));
        let last = tracker.last_error().unwrap();
        assert!(!last.contains("hunter2"));
        assert!(last.contains("[REDACTED]"));
    }

    #[test]
    fn counts_are_exact_under_contention() {
        let clock = ManualClock::new(10);
        let tracker = Arc::new(ErrorTracker::new(100, None, None));
        std::thread::scope(|s| {
            for _ in 0..16 {
                let tracker = tracker.clone();
                let clock = clock.clone();
                s.spawn(move || {
                    for _ in 0..1000 {
                        tracker.record(&clock, -6, None);
                        tracker.add_retries(2);
                    }
                });
            }
        });
        assert_eq!(tracker.stats(), (16_000, 32_000));
        assert_eq!(tracker.history_len(), 100);
    }
}
