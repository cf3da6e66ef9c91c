//! The C ABI: a thin layer that checks pointers, guards panics, converts types and calls
//! the core. Nothing here decides policy.

pub(crate) mod guard;

pub mod coordinator;
pub mod plugin;
pub mod retry;
pub mod types;
