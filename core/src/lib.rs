//! The pure Rust core of the TDengine taosX incremental-bitmap backup plugin: the retry
//! core, error handling and the error log, durable and fenced writes, log-backup commands,
//! idempotency keys and the state stores (file, and etcd with the `etcd` feature).
//!
//! It knows nothing of C: no `extern "C"`, no C pointers. The cdylib at the repository's
//! top (`src/ffi`) checks pointers, guards panics, converts types and calls this crate; the
//! contract both serve is docs/C_API.md.

// Every `unsafe` block says why it is sound (a `// SAFETY:` comment right above it).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cancel;
pub mod clock;
pub mod config;
pub mod coordinator;
pub mod diagnostics;
pub mod durable;
pub mod error;
pub mod error_log;
pub mod etcd;
pub mod fenced_write;
pub mod hex;
pub mod idempotency;
pub mod log_backup;
pub mod metrics;
pub mod plugin;
pub mod retry;
pub mod tracker;

pub use error::{Error, ErrorCode, Result};
