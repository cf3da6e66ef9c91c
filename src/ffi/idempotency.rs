//! Exports of ABI §8: operations keyed by their caller run once, across threads,
//! processes and crashes.
#![allow(non_camel_case_types)]

use super::frame::{self, required, ArgError};
use super::guard::{c_bytes, c_slice, write_optional};
use super::plugin::{done, host_op};
use crate::idempotency::MAX_KEY_BYTES as KEY_MAX;
use std::ffi::{c_char, c_void};

/// Longest idempotency key, in bytes.
pub const BACKUP_IDEMPOTENCY_KEY_MAX: usize = 255;

/// An operation run under an idempotency key: returns 0 or an error code.
pub type backup_idempotent_op_fn = Option<unsafe extern "C" fn(user_data: *mut c_void) -> i32>;

/// # Safety
/// `key` is NULL or NUL-terminated.
unsafe fn key_arg<'a>(key: *const c_char) -> Result<&'a [u8], ArgError> {
    // SAFETY: `key` is NULL or NUL-terminated (this function's contract).
    let key = unsafe { c_bytes(key, "key") }?;
    if key.is_empty() || key.len() > KEY_MAX {
        return Err(ArgError::Invalid {
            name: "key",
            problem: format!("must be 1 to {KEY_MAX} bytes, got {}", key.len()),
        });
    }
    Ok(key)
}

/// Runs `op(user_data)` at most once for `key` (1 to 255 bytes, any content), under the
/// configured retry policy. A key completed earlier with the same `fingerprint` (the bytes
/// identifying the request's payload; NULL with length 0 is allowed) returns
/// BACKUP_SUCCESS without calling `op`, and `*replayed_out` is true. Another fingerprint:
/// BACKUP_ERROR_IDEMPOTENCY_CONFLICT; claimed by a live caller: BACKUP_ERROR_IN_PROGRESS.
/// The claim is durable before `op` runs and the success before this returns; when the
/// store cannot record the claim, `op` is not called and the store's code is returned.
/// Needs an initialized plugin with a `state_dir`. `replayed_out` may be NULL.
#[no_mangle]
pub extern "C" fn backup_execute_idempotent(
    key: *const c_char,
    fingerprint: *const c_void,
    fingerprint_len: usize,
    op: backup_idempotent_op_fn,
    user_data: *mut c_void,
    replayed_out: *mut bool,
) -> i32 {
    // SAFETY: replayed_out is NULL or writable.
    let report = |replayed: bool| unsafe { write_optional(replayed_out, replayed) };
    frame::booked(
        || {
            report(false);
            // SAFETY: key NUL-terminated; fingerprint valid for fingerprint_len bytes.
            unsafe {
                Ok((
                    key_arg(key)?,
                    c_slice(fingerprint as *const u8, fingerprint_len, "fingerprint")?,
                    required(op, "op")?,
                ))
            }
        },
        |plugin, (key, fingerprint, op)| {
            let replayed = plugin.execute_idempotent(key, fingerprint, host_op(op, user_data))?;
            report(replayed);
            done(Ok(()))
        },
    )
}

/// Drops what is stored under `key`, so that its operation may run again. A key that is
/// not stored is BACKUP_SUCCESS; a key a live caller is running is kept and
/// BACKUP_ERROR_IN_PROGRESS returned. Needs an initialized plugin with a `state_dir`.
#[no_mangle]
pub extern "C" fn backup_idempotency_forget(key: *const c_char) -> i32 {
    frame::unbooked(
        // SAFETY: key NUL-terminated.
        || unsafe { key_arg(key) },
        |plugin, key| done(plugin.forget_idempotency_key(key)),
    )
}
