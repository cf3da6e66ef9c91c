//! Retry and error-handling core of the TDengine taosX incremental-bitmap backup plugin.
//!
//! The crate is a pure Rust core (everything outside `ffi`) that knows nothing of C, and a
//! thin `ffi` layer that checks pointers, guards panics, converts types and calls the core.
//! The C contract is `include/backup_coordinator.h` (generated), described in `docs/C_API.md`.

// Every `unsafe` block says why it is sound (a `// SAFETY:` comment right above it).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cancel;
pub mod cli;
pub mod clock;
pub mod config;
pub mod coordinator;
pub mod diagnostics;
pub mod durable;
pub mod error;
pub mod error_log;
pub mod etcd;
pub mod fenced_write;
mod hex;
pub mod idempotency;
pub mod log_backup;
pub mod metrics;
pub mod plugin;
pub mod retry;
pub mod tracker;

pub mod ffi;

pub use error::{ErrorCode, Failure};
