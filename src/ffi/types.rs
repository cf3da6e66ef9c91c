//! The C types of the contract. Layouts are fixed (C_API §2, §3): hosts `malloc` and fill them.
//!
//! C enums are read as plain `int32_t` (`ERetryState` & co. are written by hand in the
//! header), so that a value C puts there can never be an invalid Rust enum.

use backup_coordinator_core::error::ErrorCode;
use std::ffi::{c_char, CStr};

// The codes of C_API §1, as the header's `#define`s. Their values and messages come from
// the one table in `backup_coordinator_core::error` (`for_each_error_code!`); they are written out here because
// cbindgen reads this source without expanding macros (and a build.rs generating them
// would put generated Rust under src/). The test `every_code_constant_is_in_the_table`
// below fails if a constant here and the table disagree, or one lacks the other.
pub const BACKUP_SUCCESS: i32 = 0;
pub const BACKUP_ERROR_INVALID_PARAM: i32 = -1;
pub const BACKUP_ERROR_INIT_FAILED: i32 = -2;
pub const BACKUP_ERROR_NOT_INITIALIZED: i32 = -3;
pub const BACKUP_ERROR_MEMORY_ALLOC: i32 = -4;
pub const BACKUP_ERROR_FILE_IO: i32 = -5;
pub const BACKUP_ERROR_NETWORK: i32 = -6;
pub const BACKUP_ERROR_TIMEOUT: i32 = -7;
pub const BACKUP_ERROR_DATA_CORRUPTION: i32 = -8;
pub const BACKUP_ERROR_PERMISSION_DENIED: i32 = -9;
pub const BACKUP_ERROR_DISK_FULL: i32 = -10;
pub const BACKUP_ERROR_CONNECTION_LOST: i32 = -11;
pub const BACKUP_ERROR_RETRY_EXHAUSTED: i32 = -12;
pub const BACKUP_ERROR_INVALID_STATE: i32 = -13;
pub const BACKUP_ERROR_IN_PROGRESS: i32 = -14;
pub const BACKUP_ERROR_IDEMPOTENCY_CONFLICT: i32 = -15;
pub const BACKUP_ERROR_CANCELLED: i32 = -16;
pub const BACKUP_ERROR_LEASE_LOST: i32 = -17;
pub const BACKUP_ERROR_FENCED: i32 = -18;
pub const BACKUP_ERROR_UNKNOWN: i32 = -99;

/// The static C messages of `backup_error_string` (C_API §1), from the core's one table.
macro_rules! c_messages {
    ($(($variant:ident, $c_name:ident, $value:literal, $message:literal, $retryable:literal),)*) => {
        /// The fixed message of `code` as the static C string `backup_error_string` returns:
        /// the core's text, NUL-terminated at compile time (a message with an inner NUL
        /// fails the build).
        pub(crate) fn c_message(code: ErrorCode) -> &'static CStr {
            match code {
                $(ErrorCode::$variant => {
                    const TEXT: &CStr = match CStr::from_bytes_with_nul(concat!($message, "\0").as_bytes()) {
                        Ok(text) => text,
                        Err(_) => panic!("an error message must not contain NUL"),
                    };
                    TEXT
                })*
            }
        }
    };
}
backup_coordinator_core::for_each_error_code!(c_messages);

/// Capacity of `SBackupErrorRecord::message`, NUL included.
pub const BACKUP_ERROR_MESSAGE_MAX: usize = 256;

/// `ERetryState` as C stores it (see the enum in the header).
pub type ERetryState = i32;

/// A C `bool` field as C wrote it: one byte, any non-zero value true. The header spells
/// it `bool` (cbindgen.toml renames it), so the layout is C's; but Rust reads the byte, not
/// a Rust `bool`, which may only ever hold 0 or 1 (a harness that leaves 2 or 0xff in
/// malloc'd memory would otherwise be undefined behaviour).
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct CBool(u8);

impl CBool {
    pub const FALSE: CBool = CBool(0);
    pub const TRUE: CBool = CBool(1);

    pub const fn get(self) -> bool {
        self.0 != 0
    }
}

impl From<bool> for CBool {
    fn from(value: bool) -> Self {
        CBool(value as u8)
    }
}

impl std::fmt::Debug for CBool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:#04x})", self.get(), self.0)
    }
}

/// Opaque engine of the original plugin; may be NULL.
pub struct SBitmapEngine {
    _private: [u8; 0],
}

/// Opaque event interceptor of the original plugin; may be NULL.
pub struct SEventInterceptor {
    _private: [u8; 0],
}

/// Incremental cursor of the original plugin; opaque to this library (its fields are
/// declared in the header for source compatibility).
pub struct SIncrementalCursor {
    _private: [u8; 0],
}

/// State of one retried execution. Caller-allocated; `error_message` belongs to the
/// library and is freed by `backup_retry_context_destroy`.
#[repr(C)]
pub struct SRetryContext {
    /// Retries done in the current/last execution.
    pub current_retry: u32,
    /// Retries allowed after the first attempt.
    pub max_retry: u32,
    /// Seconds between attempts (taosX `error.retry.interval`).
    pub retry_interval: u32,
    /// Unix ms of the last retry.
    pub last_retry_time: u64,
    pub state: ERetryState,
    /// Last error an attempt returned.
    pub last_error: i32,
    /// Message of the last failed attempt's code; NULL after a success. Library-owned.
    pub error_message: *mut c_char,
}

/// Extended retry policy: exponential backoff with a cap, jitter and a time budget.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SRetryPolicy {
    pub max_retry: u32,
    pub initial_interval_ms: u64,
    /// Cap of one wait; 0 = no cap.
    pub max_interval_ms: u64,
    /// 1.0 = fixed interval; 0 (a zero-initialized policy) is taken as 1.0.
    pub multiplier: f64,
    /// Full jitter on each wait.
    pub jitter: CBool,
    /// 0 = none; budget from the first failure, no wait may end past it.
    pub timeout_ms: u64,
}

/// Coordinator configuration, field order of the original plugin.
#[repr(C)]
pub struct SBackupCoordinatorConfig {
    pub max_blocks_per_batch: u32,
    pub batch_timeout_ms: u32,
    pub enable_compression: CBool,
    pub enable_encryption: CBool,
    /// Never logged.
    pub encryption_key: *mut c_char,
    pub error_retry_max: u32,
    /// Seconds.
    pub error_retry_interval: u32,
    pub error_store_path: *mut c_char,
    pub enable_error_logging: CBool,
    pub error_buffer_size: u32,
    pub backup_path: *mut c_char,
    pub backup_max_size: u64,
    pub compression_level: u8,
}

/// Coordinator, field order of the original plugin. May be allocated by
/// `backup_coordinator_init` or by the caller with `malloc`; `backup_coordinator_destroy`
/// frees it in both cases, and frees config strings only when the library copied them.
#[repr(C)]
pub struct SBackupCoordinator {
    pub config: SBackupCoordinatorConfig,
    pub bitmap_engine: *mut SBitmapEngine,
    pub event_interceptor: *mut SEventInterceptor,
    pub active_cursor: *mut SIncrementalCursor,
    pub retry_context: SRetryContext,
    /// malloc'd by the library; the library frees it.
    pub last_error_message: *mut c_char,
    pub error_count: u64,
    pub retry_count: u64,
    pub total_backup_blocks: u64,
    pub total_backup_size: u64,
    pub backup_duration_ms: u64,
}

/// One entry of the in-memory error history.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SBackupErrorRecord {
    /// Unix ms when the error was recorded.
    pub timestamp_ms: u64,
    pub code: i32,
    /// NUL-terminated, truncated to fit.
    pub message: [c_char; BACKUP_ERROR_MESSAGE_MAX],
}

#[cfg(test)]
mod tests {
    use super::c_message;
    use backup_coordinator_core::error::ErrorCode;

    #[test]
    fn the_c_messages_are_the_messages() {
        for code in ErrorCode::ALL {
            assert_eq!(c_message(code).to_str(), Ok(code.message()));
        }
    }

    /// Every `pub const NAME: i32 = VALUE;` of this file is a code, and the codes here are
    /// those of the table in `backup_coordinator_core::error`, name for name and value for value.
    #[test]
    fn every_code_constant_is_in_the_table() {
        let here: Vec<(String, i32)> = include_str!("types.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("pub const "))
            .filter_map(|rest| rest.split_once(": i32 = "))
            .map(|(name, value)| {
                let value = value.trim_end_matches(';').parse().expect("an i32 literal");
                (name.to_owned(), value)
            })
            .collect();
        let table: Vec<(String, i32)> = ErrorCode::ALL
            .into_iter()
            .map(|code| (code.c_name().to_owned(), code.raw()))
            .collect();
        assert_eq!(here, table);
    }
}
