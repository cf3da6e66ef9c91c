//! A backup coordinator's error handling (C_API §3), in plain Rust: its own error tracker and
//! log, and durable writes retried under the policy of its retry context.

use crate::clock::SystemClock;
use crate::durable;
use crate::error::Error;
use crate::error_log::{ErrorLog, LogSettings};
use crate::retry::{self, Execution, RetryPolicy, RetryProgress};
use crate::tracker::ErrorTracker;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// What a coordinator's config says about error handling.
#[derive(Debug, Clone, Default)]
pub struct CoordinatorSettings {
    pub error_store_path: Option<PathBuf>,
    pub enable_error_logging: bool,
    pub error_buffer_size: usize,
    /// The encryption key: redacted from every message and log line.
    pub secret: Option<String>,
}

pub struct Coordinator {
    tracker: ErrorTracker,
}

impl Coordinator {
    /// `errors` and `retries` continue the counts a caller-filled structure holds.
    pub fn new(settings: CoordinatorSettings, errors: u64, retries: u64) -> Self {
        let log = match (settings.error_store_path, settings.enable_error_logging) {
            (Some(dir), true) => Some(ErrorLog::shared(LogSettings::with_default_rotation(dir))),
            _ => None,
        };
        Coordinator {
            tracker: ErrorTracker::new(settings.error_buffer_size, log, settings.secret)
                .with_counts(errors, retries),
        }
    }

    pub fn tracker(&self) -> &ErrorTracker {
        &self.tracker
    }

    pub fn record_error(&self, code: i32, message: Option<&str>) {
        self.tracker.record(&SystemClock, code, message);
    }

    /// Durable replacement of `path`, retried under `policy`; the retries are counted. A
    /// final failure is the caller's to record as an error of the coordinator (the C frame
    /// books every failure of a coordinator's operation in one place).
    pub fn write_file(
        &self,
        policy: &RetryPolicy,
        progress: &mut RetryProgress,
        path: &Path,
        data: &[u8],
    ) -> Execution {
        let mut execution = retry::run_now(policy, progress, retry::no_progress, |_| {
            durable::write_atomic(path, data).map_err(Error::from)
        });
        // The details name the path: no secret leaves through them either.
        let failures = execution.result.as_mut().err().into_iter();
        for failure in failures.chain(execution.last_failure.as_mut()) {
            if let Cow::Owned(redacted) = self.tracker.redact(&failure.detail()) {
                *failure = failure.with_text(redacted);
            }
        }
        self.tracker.add_retries(execution.retries as u64);
        execution
    }
}
