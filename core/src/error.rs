//! The taosX error codes, their messages and which of them are worth retrying.
//!
//! Inside Rust a failure is an [`Error`]: what went wrong, with its context (path, errno,
//! key, task), classified by the taosX code it is reported as. The C layer turns it into
//! an `int32_t` and a message, in one place.

use std::sync::Arc;

/// Defines [`ErrorCode`] and everything the core says about a code from the table of
/// [`for_each_error_code`] (docs/C_API.md §1): the enum, [`ErrorCode::ALL`], the C name, the
/// message and whether the code is retried.
///
/// The C header's `BACKUP_ERROR_*` constants are `pub const` items in `ffi/types.rs`,
/// written out there because cbindgen reads the source and does not expand macros; a unit
/// test there checks them against this table, and one here checks the docs' table.
macro_rules! error_codes {
    ($(($variant:ident, $c_name:ident, $value:literal, $message:literal, $retryable:literal),)*) => {
        /// Every code of the contract. Values are fixed: hosts compile against them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(i32)]
        pub enum ErrorCode {
            $($variant = $value,)*
        }

        impl ErrorCode {
            /// Every code, in the order of the table.
            pub const ALL: [ErrorCode; [$($value),*].len()] = [$(ErrorCode::$variant),*];

            /// The name of the code in the C header (`BACKUP_ERROR_FENCED`).
            pub fn c_name(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => stringify!($c_name),)*
                }
            }

            /// The fixed message of the code (C_API §1).
            pub fn message(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $message,)*
                }
            }

            /// Transient failures that a later attempt may not meet again.
            pub fn is_retryable(self) -> bool {
                match self {
                    $(ErrorCode::$variant => $retryable,)*
                }
            }
        }
    };
}

/// The table of docs/C_API.md §1, one row per code: (variant, C name, value, message,
/// retried). It hands the rows to the macro it is given, so that every crate derives what it
/// says of the codes from this one table: [`ErrorCode`] here, the static C messages of
/// `backup_error_string` in the C layer.
#[macro_export]
macro_rules! for_each_error_code {
    ($callback:ident) => {
        $callback! {
            (Success, BACKUP_SUCCESS, 0, "Success", false),
            (InvalidParam, BACKUP_ERROR_INVALID_PARAM, -1, "Invalid parameter", false),
            (InitFailed, BACKUP_ERROR_INIT_FAILED, -2, "Initialization failed", false),
            (NotInitialized, BACKUP_ERROR_NOT_INITIALIZED, -3, "Not initialized", false),
            (MemoryAlloc, BACKUP_ERROR_MEMORY_ALLOC, -4, "Memory allocation failed", false),
            (FileIo, BACKUP_ERROR_FILE_IO, -5, "File I/O error", true),
            (Network, BACKUP_ERROR_NETWORK, -6, "Network error", true),
            (Timeout, BACKUP_ERROR_TIMEOUT, -7, "Operation timeout", true),
            (DataCorruption, BACKUP_ERROR_DATA_CORRUPTION, -8, "Data corruption detected", false),
            (PermissionDenied, BACKUP_ERROR_PERMISSION_DENIED, -9, "Permission denied", false),
            (DiskFull, BACKUP_ERROR_DISK_FULL, -10, "Disk full", false),
            (ConnectionLost, BACKUP_ERROR_CONNECTION_LOST, -11, "Connection lost", true),
            (RetryExhausted, BACKUP_ERROR_RETRY_EXHAUSTED, -12, "Retry attempts exhausted", false),
            (InvalidState, BACKUP_ERROR_INVALID_STATE, -13, "Invalid state for command", false),
            (InProgress, BACKUP_ERROR_IN_PROGRESS, -14, "Operation already in progress", false),
            (IdempotencyConflict, BACKUP_ERROR_IDEMPOTENCY_CONFLICT, -15,
                "Idempotency key reused with different payload", false),
            (Cancelled, BACKUP_ERROR_CANCELLED, -16, "Operation cancelled", false),
            (LeaseLost, BACKUP_ERROR_LEASE_LOST, -17, "Claim lease lost", false),
            (Fenced, BACKUP_ERROR_FENCED, -18, "Fenced by a newer claim", false),
            (Unknown, BACKUP_ERROR_UNKNOWN, -99, "Unknown error", false),
        }
    };
}

for_each_error_code!(error_codes);

impl ErrorCode {
    /// The code for a raw value, or `None` for a value outside the table.
    pub fn from_raw(raw: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|code| *code as i32 == raw)
    }

    pub fn raw(self) -> i32 {
        self as i32
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

/// What went wrong, with the context a person needs (the path, the key, the task, the
/// last error of a retried operation). Each variant is classified by the taosX code it is
/// reported as ([`Error::kind`], [`Error::code`]); the text shown to users is its
/// `Display`, which starts with the code's own message. Turning it into what C receives
/// happens in one place, in `ffi`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A caller's argument or setting breaks a rule; the text names it.
    #[error("Invalid parameter: {0}")]
    InvalidArgument(String),
    /// A config that cannot be used; the text names the key and the value (from a
    /// `config::ConfigError`).
    #[error("invalid config: {0}")]
    Config(String),
    /// A plugin call before `backup_plugin_init` or after cleanup.
    #[error("Plugin not initialized")]
    NotInitialized,
    /// Init refused for a reason other than a bad setting.
    #[error("Initialization failed: {0}")]
    InitFailed(String),
    /// File work that failed: the operation, the path and the OS error (a
    /// `durable::FileError`), classified by errno as `kind` (disk full, permission denied,
    /// or a possibly transient I/O error).
    #[error("{}: {failure}", .kind.message())]
    File {
        kind: ErrorCode,
        failure: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// Memory or a thread could not be had, or a bound is reached.
    #[error("Memory allocation failed: {0}")]
    OutOfResources(String),
    /// A panic caught at the boundary (a bug; never meant to happen).
    #[error("Unknown error: internal panic ({0})")]
    Panic(String),
    /// Stored content that cannot be right.
    #[error("Data corruption detected: {0}")]
    Corruption(String),
    /// An operation of the host failed with its own code (any value, as the host returned it).
    #[error("{}", message_of(*.0))]
    Host(i32),
    /// A host's operation failed with its code; the text says which operation.
    #[error("{what} failed with {code}: {}", message_of(*.code))]
    HostCall { what: String, code: i32 },
    /// Every retry failed.
    #[error("Retry attempts exhausted: {context}; last error {}: {last}", .last.code())]
    RetryExhausted { context: String, last: Box<Error> },
    /// The next wait would end past the retry budget.
    #[error("Operation timeout: {context}; last error {}: {last}", .last.code())]
    Timeout { context: String, last: Box<Error> },
    /// Plugin cleanup cancelled the call.
    #[error("Operation cancelled: {0}")]
    Cancelled(String),
    /// The key, or the (task, command), is being run by another caller.
    #[error("Operation already in progress: {0}")]
    InProgress(String),
    /// An idempotency key reused with another payload.
    #[error("Idempotency key reused with different payload: {0}")]
    Conflict(String),
    /// A command the task's state does not allow.
    #[error("Invalid state for command: {0}")]
    InvalidState(String),
    /// A state that may yet change (a task's state UNKNOWN, an attempt cut short).
    #[error("{0}")]
    Indeterminate(String),
    /// An idempotent operation that ran, but whose completion could not be recorded.
    #[error("the operation of key {key} ran, but its completion was not recorded ({source}); the key stays claimed until its lease runs out")]
    NotRecorded { key: String, source: Box<Error> },
    /// Another error, with what it means here said after it (`note` brings its separator).
    #[error("{source}{note}")]
    Context { source: Box<Error>, note: String },
    /// The claim an operation ran under may have lapsed (its renewals failed, its owner
    /// stalled) or was taken over: its effect must be fenced downstream.
    #[error("Claim lease lost: {0}")]
    LeaseLost(String),
    /// A write refused because a newer claim's write of the same destination came first.
    #[error("Fenced by a newer claim: {0}")]
    Fenced(String),
    /// A failure of the shared state store on etcd (unreachable, refused, rejected),
    /// classified by `kind`.
    #[error("{}: {detail}", .kind.message())]
    Etcd { kind: ErrorCode, detail: String },
    /// Another error whose text had a secret in it: the text redacted, the class kept.
    #[error("{text}")]
    Redacted { kind: ErrorCode, text: String },
}

/// The core's result: an [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The taosX code this error is reported as; a host's own code as the host returned it.
    pub fn code(&self) -> i32 {
        match self {
            Error::Host(code) | Error::HostCall { code, .. } => *code,
            Error::NotRecorded { source, .. } | Error::Context { source, .. } => source.code(),
            other => other.kind().raw(),
        }
    }

    /// The code's class in the taosX error model (`Unknown` for a host code outside it).
    pub fn kind(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) | Error::Config(_) => ErrorCode::InvalidParam,
            Error::OutOfResources(_) => ErrorCode::MemoryAlloc,
            Error::Panic(_) => ErrorCode::Unknown,
            Error::NotInitialized => ErrorCode::NotInitialized,
            Error::InitFailed(_) => ErrorCode::InitFailed,
            Error::File { kind, .. } => *kind,
            Error::Corruption(_) => ErrorCode::DataCorruption,
            Error::Host(code) | Error::HostCall { code, .. } => {
                ErrorCode::from_raw(*code).unwrap_or(ErrorCode::Unknown)
            }
            Error::RetryExhausted { .. } => ErrorCode::RetryExhausted,
            Error::Timeout { .. } => ErrorCode::Timeout,
            Error::Cancelled(_) => ErrorCode::Cancelled,
            Error::InProgress(_) => ErrorCode::InProgress,
            Error::Conflict(_) => ErrorCode::IdempotencyConflict,
            Error::InvalidState(_) => ErrorCode::InvalidState,
            Error::LeaseLost(_) => ErrorCode::LeaseLost,
            Error::Fenced(_) => ErrorCode::Fenced,
            Error::Indeterminate(_) => ErrorCode::Unknown,
            Error::NotRecorded { source, .. } | Error::Context { source, .. } => source.kind(),
            Error::Etcd { kind, .. } | Error::Redacted { kind, .. } => *kind,
        }
    }

    /// Worth another attempt (a transient failure).
    pub fn is_retryable(&self) -> bool {
        is_retryable(self.code())
    }

    /// The text a person reads.
    pub fn detail(&self) -> String {
        self.to_string()
    }

    /// A failure of the etcd store, classified by `kind`.
    pub fn etcd(kind: ErrorCode, detail: impl Into<String>) -> Self {
        Error::Etcd {
            kind,
            detail: detail.into(),
        }
    }

    /// This error, its text replaced (secrets redacted), its class kept.
    pub fn with_text(&self, text: String) -> Self {
        Error::Redacted {
            kind: self.kind(),
            text,
        }
    }

    /// This error, with what it means here said after it (`note` brings its separator).
    pub fn context(self, note: impl Into<String>) -> Self {
        Error::Context {
            source: Box::new(self),
            note: note.into(),
        }
    }

    /// What a state-store access retried through a policy gives up with: the store's own
    /// failure (NETWORK, CONNECTION_LOST, FILE_IO, ...) with the retries said and what did
    /// not happen (`nothing_done`), rather than RETRY_EXHAUSTED or TIMEOUT, which would
    /// hide that the store, not an operation, failed. Cancellation stays as it is.
    pub fn store_gave_up(self, nothing_done: &str) -> Self {
        match self {
            Error::RetryExhausted { context, last } | Error::Timeout { context, last } => {
                Error::Context {
                    source: last,
                    note: format!(" ({nothing_done}: {context})"),
                }
            }
            other => other,
        }
    }
}

impl PartialEq for Error {
    /// Same code, same text (an I/O error has no equality of its own).
    fn eq(&self, other: &Self) -> bool {
        self.code() == other.code() && self.to_string() == other.to_string()
    }
}

impl Eq for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_messages_match_the_contract() {
        assert_eq!(ErrorCode::Success.raw(), 0);
        assert_eq!(ErrorCode::RetryExhausted.raw(), -12);
        assert_eq!(ErrorCode::Cancelled.raw(), -16);
        assert_eq!(ErrorCode::LeaseLost.raw(), -17);
        assert_eq!(ErrorCode::Fenced.raw(), -18);
        assert_eq!(message_of(-17), "Claim lease lost");
        assert_eq!(message_of(-18), "Fenced by a newer claim");
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
        assert_eq!(ErrorCode::from_raw(-19), None);
    }

    /// The table of docs/C_API.md §1 says what the table of this file says, row by row.
    #[test]
    fn the_docs_table_is_this_table() {
        let docs = include_str!("../../docs/C_API.md");
        let section = docs
            .split("## §1 Error codes")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/C_API.md has a §1");
        let rows: Vec<String> = section
            .lines()
            .filter(|line| line.starts_with("| `BACKUP_"))
            .map(str::to_owned)
            .collect();
        let expected: Vec<String> = ErrorCode::ALL
            .into_iter()
            .map(|code| {
                let retried = match code {
                    ErrorCode::Success => " ",
                    _ if code.is_retryable() => " yes ",
                    _ => " no ",
                };
                format!(
                    "| `{}` | {} |{retried}| \"{}\" |",
                    code.c_name(),
                    code.raw(),
                    code.message()
                )
            })
            .collect();
        assert_eq!(rows, expected);
    }
}
