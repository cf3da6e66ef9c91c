//! Error bookkeeping shared by the plugin instance and by coordinators: the last error,
//! the error and retry counts, a bounded history of recent errors, and the file log; and
//! the redaction of configured secrets from everything recorded.

use crate::clock::Clock;
use crate::error::message_of;
use crate::error_log::{sanitize_message, ErrorLog};
use parking_lot::Mutex;
use std::borrow::Cow;
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
    /// Secrets (encryption keys, passwords) that never reach a message, the log or the history.
    redactor: Redactor,
}

impl ErrorTracker {
    /// `secrets`: every configured secret (`None` for none, an `Option<String>` for one, or
    /// any iterator of `String`s); empty ones are ignored.
    pub fn new(
        history_capacity: usize,
        log: Option<Arc<ErrorLog>>,
        secrets: impl IntoIterator<Item = String>,
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
            redactor: Redactor::new(secrets),
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
        let message = self.clean(message.unwrap_or_else(|| message_of(code)));
        let unix_ms = clock.unix_ms();
        self.error_count.fetch_add(1, Ordering::Relaxed);
        // The record is built before the lock, and what it replaces is freed after it.
        let record = (self.history_capacity > 0).then(|| ErrorRecord {
            unix_ms,
            code,
            message: message.clone(),
        });
        let (_evicted, _previous) = {
            let mut recent = self.recent.lock();
            let evicted = record.and_then(|record| {
                let evicted = if recent.history.len() == self.history_capacity {
                    recent.history.pop_front()
                } else {
                    None
                };
                recent.history.push_back(record);
                evicted
            });
            (evicted, recent.last.replace(message.clone()))
        };
        if let Some(log) = &self.log {
            log.append(clock, unix_ms, code, &message);
        }
    }

    /// Makes `message` the last error without booking it: for the calls of C_API §4 that
    /// are not plugin-level operations (their failures name the problem, uncounted).
    pub fn set_last_error(&self, message: &str) {
        let message = self.clean(message);
        self.recent.lock().last = Some(message);
    }

    /// A message as it may be shown and logged. Redaction first, on the raw text: a cut
    /// could leave part of a secret, and control characters turned into spaces would hide
    /// one containing a tab.
    fn clean(&self, text: &str) -> Arc<str> {
        let redacted = self.redactor.redact(text);
        Arc::from(&*sanitize_message(&redacted))
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

    /// `text` with every configured secret taken out (for text shown outside the tracker).
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        self.redactor.redact(text)
    }
}

/// What stands where a secret was.
pub const REDACTED: &str = "[REDACTED]";

/// Takes configured secrets out of text, whole, before anything cuts or rewrites it.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so that a secret containing another goes whole. Each secret with
    /// control characters is also here as it reads once they became spaces.
    patterns: Vec<String>,
}

impl Redactor {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut patterns = Vec::new();
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            if secret.chars().any(char::is_control) {
                let spaced: String = secret
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                if !spaced.trim().is_empty() {
                    patterns.push(spaced);
                }
            }
            // A secret that was not UTF-8 reached us with U+FFFD for its bad bytes; where a
            // message's own bytes made those decode otherwise, its long valid runs still go.
            if secret.contains(char::REPLACEMENT_CHARACTER) {
                patterns.extend(
                    secret
                        .split(char::REPLACEMENT_CHARACTER)
                        .filter(|run| run.len() >= 8)
                        .map(str::to_string),
                );
            }
            patterns.push(secret);
        }
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        Redactor { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// `text` with every secret replaced by `[REDACTED]`; borrowed when there is none in it.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for secret in &self.patterns {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
            }
        }
        // A secret may reappear across a marker and its neighbours (or be part of the
        // marker itself): then the occurrences go without a marker, until none is left.
        // Each pass makes the text shorter, so this ends.
        while let Some(secret) = self.patterns.iter().find(|s| out.contains(s.as_str())) {
            out = Cow::Owned(out.replace(secret.as_str(), ""));
        }
        out
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

    /// Every 8-byte window of `secret` (the whole of a shorter one).
    fn windows(secret: &str) -> Vec<&[u8]> {
        let bytes = secret.as_bytes();
        if bytes.len() <= 8 {
            return vec![bytes];
        }
        bytes.windows(8).collect()
    }

    #[test]
    fn a_secret_goes_before_the_cut_and_before_control_characters_become_spaces() {
        let clock = ManualClock::new(10);
        let keys = [
            "0123456789abcdef0123456789abcdef",
            "key\twith\ttabs-and-more-bytes",
            "line\nbreak\x07bell\x1b[0m-key",
            "ключ-шифрования-ключ",
        ];
        let tracker = ErrorTracker::new(
            10_000,
            None,
            keys.iter().map(|k| k.to_string()).chain(["".to_string()]),
        );
        for key in keys {
            for offset in 4040..4110 {
                let text = format!("{}{key} trailing", "m".repeat(offset));
                tracker.record(&clock, -8, Some(&text));
                let last = tracker.last_error().unwrap();
                assert!(last.len() <= crate::error_log::MAX_MESSAGE_BYTES);
                for window in windows(key) {
                    let window = String::from_utf8_lossy(window);
                    let spaced: String = window
                        .chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect();
                    assert!(
                        !last.contains(&*window) && !last.contains(&spaced),
                        "{key:?} at offset {offset}: {window:?} in the message"
                    );
                }
            }
        }
    }

    #[test]
    fn redaction_ends_even_when_the_secret_is_part_of_the_marker() {
        let redactor = Redactor::new(["REDACTED".to_string(), "ab".to_string()]);
        assert_eq!(redactor.redact("x REDACTED y"), "x [] y");
        assert_eq!(redactor.redact("aabb"), "a[]b");
        let single = Redactor::new(["ab".to_string()]);
        assert_eq!(single.redact("aabb"), "a[REDACTED]b");
        assert_eq!(redactor.redact("clean"), "clean");
        assert!(matches!(redactor.redact("clean"), Cow::Borrowed(_)));
        assert!(Redactor::new(None).is_empty());
    }

    #[test]
    fn the_valid_runs_of_a_secret_that_was_not_utf8_go_too() {
        let key =
            String::from_utf8_lossy(b"\x80first-run-of-key\xffsecond-run-of-key").into_owned();
        let redactor = Redactor::new([key]);
        // The message's byte before the key made "\xC3\x80" decode as one character.
        let message = String::from_utf8_lossy(b"x \xC3\x80first-run-of-key\xffsecond-run-of-key y");
        let out = redactor.redact(&message);
        assert!(!out.contains("run-of-"), "{out}");
    }
}
