//! The taosX error codes, their messages and which of them are worth retrying.
//!
//! Codes cross the C boundary as plain `i32`; inside Rust a failure carries its code
//! together with a human-readable detail (path, errno, key) in [`Failure`].

use std::ffi::CStr;
use std::fmt;

/// Every code of the contract. Values are fixed: hosts compile against them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ErrorCode {
    Success = 0,
    InvalidParam = -1,
    InitFailed = -2,
    NotInitialized = -3,
    MemoryAlloc = -4,
    FileIo = -5,
    Network = -6,
    Timeout = -7,
    DataCorruption = -8,
    PermissionDenied = -9,
    DiskFull = -10,
    ConnectionLost = -11,
    RetryExhausted = -12,
    InvalidState = -13,
    InProgress = -14,
    IdempotencyConflict = -15,
    Cancelled = -16,
    Unknown = -99,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::Success,
        ErrorCode::InvalidParam,
        ErrorCode::InitFailed,
        ErrorCode::NotInitialized,
        ErrorCode::MemoryAlloc,
        ErrorCode::FileIo,
        ErrorCode::Network,
        ErrorCode::Timeout,
        ErrorCode::DataCorruption,
        ErrorCode::PermissionDenied,
        ErrorCode::DiskFull,
        ErrorCode::ConnectionLost,
        ErrorCode::RetryExhausted,
        ErrorCode::InvalidState,
        ErrorCode::InProgress,
        ErrorCode::IdempotencyConflict,
        ErrorCode::Cancelled,
        ErrorCode::Unknown,
    ];

    /// The code for a raw value, or `None` for a value outside the table.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|code| *code as i32 == raw)
    }

    pub fn raw(self) -> i32 {
        self as i32
    }

    /// The fixed message, NUL-terminated so the FFI can hand it out as a static C string.
    pub fn message_cstr(self) -> &'static CStr {
        match self {
            ErrorCode::Success => c"Success",
            ErrorCode::InvalidParam => c"Invalid parameter",
            ErrorCode::InitFailed => c"Initialization failed",
            ErrorCode::NotInitialized => c"Not initialized",
            ErrorCode::MemoryAlloc => c"Memory allocation failed",
            ErrorCode::FileIo => c"File I/O error",
            ErrorCode::Network => c"Network error",
            ErrorCode::Timeout => c"Operation timeout",
            ErrorCode::DataCorruption => c"Data corruption detected",
            ErrorCode::PermissionDenied => c"Permission denied",
            ErrorCode::DiskFull => c"Disk full",
            ErrorCode::ConnectionLost => c"Connection lost",
            ErrorCode::RetryExhausted => c"Retry attempts exhausted",
            ErrorCode::InvalidState => c"Invalid state for command",
            ErrorCode::InProgress => c"Operation already in progress",
            ErrorCode::IdempotencyConflict => c"Idempotency key reused with different payload",
            ErrorCode::Cancelled => c"Operation cancelled",
            ErrorCode::Unknown => c"Unknown error",
        }
    }

    pub fn message(self) -> &'static str {
        // The literals above are ASCII.
        self.message_cstr().to_str().unwrap_or("Unknown error")
    }

    /// Transient failures that a later attempt may not meet again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::FileIo | ErrorCode::Network | ErrorCode::Timeout | ErrorCode::ConnectionLost
        )
    }
}

/// Message of any raw code; values outside the table read "Unknown error".
pub fn message_of(raw: i32) -> &'static str {
    ErrorCode::from_raw(raw)
        .unwrap_or(ErrorCode::Unknown)
        .message()
}

/// Whether a raw code is retryable; values outside the table never are.
pub fn is_retryable(raw: i32) -> bool {
    ErrorCode::from_raw(raw).is_some_and(ErrorCode::is_retryable)
}

/// A failed operation: the code that crosses the boundary, and the detail a person reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: i32,
    pub detail: String,
}

impl Failure {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Failure {
            code: code.raw(),
            detail: detail.into(),
        }
    }

    /// A failure known only by its code (an operation of the host's): the code's own message.
    pub fn from_code(raw: i32) -> Self {
        Failure {
            code: raw,
            detail: message_of(raw).to_string(),
        }
    }

    pub fn invalid_param(detail: impl Into<String>) -> Self {
        Failure::new(ErrorCode::InvalidParam, detail)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for Failure {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_messages_match_the_contract() {
        assert_eq!(ErrorCode::Success.raw(), 0);
        assert_eq!(ErrorCode::RetryExhausted.raw(), -12);
        assert_eq!(ErrorCode::Cancelled.raw(), -16);
        assert_eq!(ErrorCode::Unknown.raw(), -99);
        assert_eq!(message_of(-10), "Disk full");
        assert_eq!(
            message_of(-15),
            "Idempotency key reused with different payload"
        );
        assert_eq!(message_of(-1234), "Unknown error");
        assert_eq!(message_of(7), "Unknown error");
    }

    #[test]
    fn only_transient_codes_are_retryable() {
        let retryable: Vec<i32> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.is_retryable())
            .map(ErrorCode::raw)
            .collect();
        assert_eq!(retryable, vec![-5, -6, -7, -11]);
        assert!(!is_retryable(-1000));
        assert!(!is_retryable(0));
    }

    #[test]
    fn every_code_round_trips() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_raw(code.raw()), Some(code));
        }
        assert_eq!(ErrorCode::from_raw(-17), None);
    }
}
