//! The C ABI: a thin layer that checks pointers, guards panics, converts types and calls
//! the core. Nothing here decides policy.
// Exports take raw pointers from C by contract and check them before use; marking them
// `unsafe fn` would change nothing for C callers (rustls-ffi makes the same choice).
#![allow(clippy::not_unsafe_ptr_arg_deref)]

#[cfg(test)]
mod export_table;
pub(crate) mod frame;
pub(crate) mod guard;

pub mod coordinator;
pub mod idempotency;
pub mod log_backup;
pub mod plugin;
pub mod registry;
pub mod retry;
pub mod types;
