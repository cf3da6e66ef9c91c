//! Exports of ABI §8: operations keyed by their caller run once, across threads,
//! processes and crashes.
#![allow(non_camel_case_types)]

use super::guard::{c_bytes, c_slice, ffi_guard, null_arg};
use super::plugin::{host_op, with_plugin, with_plugin_unbooked};
use crate::error::{ErrorCode, Failure};
use crate::idempotency::keyed::check_key;
use std::ffi::{c_char, c_void};

/// Longest idempotency key, in bytes.
pub const BACKUP_IDEMPOTENCY_KEY_MAX: usize = 255;

/// An operation run under an idempotency key: returns 0 or an error code.
pub type backup_idempotent_op_fn = Option<unsafe extern "C" fn(user_data: *mut c_void) -> i32>;

/// # Safety
/// `key` is NULL or NUL-terminated.
unsafe fn key_arg<'a>(key: *const c_char) -> Result<&'a [u8], Failure> {
    // SAFETY: `key` is NULL or NUL-terminated (this function's contract).
    let key = unsafe { c_bytes(key, "key") }?;
    check_key(key)?;
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
    ffi_guard!(ErrorCode::Unknown.raw(), {
        // SAFETY: replayed_out is NULL or writable.
        let report = |replayed: bool| unsafe {
            if let Some(out) = replayed_out.as_mut() {
                *out = replayed;
            }
        };
        report(false);
        // SAFETY: key NUL-terminated; fingerprint valid for fingerprint_len bytes.
        let args = unsafe { key_arg(key) }.and_then(|key| {
            // SAFETY: `fingerprint` is NULL or valid for `fingerprint_len` bytes (the contract).
            let fingerprint =
                unsafe { c_slice(fingerprint as *const u8, fingerprint_len, "fingerprint") }?;
            Ok((key, fingerprint, op.ok_or_else(|| null_arg("op"))?))
        });
        with_plugin(args, |plugin, (key, fingerprint, op)| {
            let replayed = plugin.execute_idempotent(key, fingerprint, host_op(op, user_data))?;
            report(replayed);
            Ok(())
        })
    })
}

/// Drops what is stored under `key`, so that its operation may run again. A key that is
/// not stored is BACKUP_SUCCESS; a key a live caller is running is kept and
/// BACKUP_ERROR_IN_PROGRESS returned. Needs an initialized plugin with a `state_dir`.
#[no_mangle]
pub extern "C" fn backup_idempotency_forget(key: *const c_char) -> i32 {
    ffi_guard!(ErrorCode::Unknown.raw(), {
        // SAFETY: key NUL-terminated.
        let key = unsafe { key_arg(key) };
        with_plugin_unbooked(key, |plugin, key| plugin.forget_idempotency_key(key))
    })
}
