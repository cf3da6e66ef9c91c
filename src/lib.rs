//! The TDengine taosX incremental-bitmap backup plugin as a C-ABI shared library: the
//! `ffi` layer over the pure Rust core (`backup-coordinator-core`, the `core/` member
//! crate), which it re-exports for the Rust tests and benches.
//!
//! `ffi` checks pointers, guards panics, converts types and calls the core; it is all that
//! cbindgen reads for `include/backup_coordinator.h`. The contract is docs/C_API.md.

// Every `unsafe` block says why it is sound (a `// SAFETY:` comment right above it).
#![deny(clippy::undocumented_unsafe_blocks)]

pub use backup_coordinator_core::{
    cancel, clock, config, coordinator, diagnostics, durable, error, error_log, etcd, fenced_write,
    idempotency, log_backup, metrics, plugin, retry, tracker,
};
pub use backup_coordinator_core::{Error, ErrorCode, Result};

pub mod ffi;
