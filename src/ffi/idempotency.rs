//! Exports of C_API §8: operations keyed by their caller run once, across threads,
//! processes and crashes.
#![allow(non_camel_case_types)]

use super::frame::{self, required, ArgError};
use super::guard::{c_bytes, c_slice, write_optional};
use super::plugin::{done, host_op};
use backup_coordinator_core::idempotency::MAX_KEY_BYTES as KEY_MAX;
use std::ffi::{c_char, c_void};

/// Longest idempotency key, in bytes.
pub const BACKUP_IDEMPOTENCY_KEY_MAX: usize = 255;
const _: () = assert!(BACKUP_IDEMPOTENCY_KEY_MAX == KEY_MAX);

/// An operation run under an idempotency key: returns 0 or an error code.
pub type backup_idempotent_op_fn = Option<unsafe extern "C" fn(user_data: *mut c_void) -> i32>;

/// An operation run under an idempotency key that fences its effect: it gets the claim's
/// fencing token (docs/C_API.md §8.1) and returns 0 or an error code.
pub type backup_fenced_op_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, fencing_token: u64) -> i32>;

/// The host's fenced operation, once checked non-NULL.
type FencedOp = unsafe extern "C" fn(*mut c_void, u64) -> i32;

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
    // SAFETY: the caller's pointers, as this export's contract says.
    unsafe {
        keyed_call(
            key,
            fingerprint,
            fingerprint_len,
            op,
            replayed_out,
            |plugin, key, fp, op| plugin.execute_idempotent(key, fp, host_op(op, user_data)),
        )
    }
}

/// The frame both keyed exports share: their arguments checked in one order,
/// `*replayed_out` false until the call succeeds, `run` given the checked arguments.
///
/// # Safety
/// `key` is NULL or NUL-terminated; `fingerprint` is valid for `fingerprint_len` bytes (or
/// NULL with 0); `replayed_out` is NULL or writable.
unsafe fn keyed_call<Op>(
    key: *const c_char,
    fingerprint: *const c_void,
    fingerprint_len: usize,
    op: Option<Op>,
    replayed_out: *mut bool,
    run: impl FnOnce(
        &backup_coordinator_core::plugin::Plugin,
        &[u8],
        &[u8],
        Op,
    ) -> Result<bool, backup_coordinator_core::error::Error>,
) -> i32 {
    // SAFETY: replayed_out is NULL or writable (this function's contract).
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
            report(run(plugin, key, fingerprint, op)?);
            done(Ok(()))
        },
    )
}

/// `backup_execute_idempotent`, for an operation that fences its effect (docs/C_API.md §8.1):
/// `op(user_data, fencing_token)` gets the claim's token, strictly greater than the token of
/// every earlier claim of `key` (the same token on every attempt of the retry policy within
/// this call), and should pass it to where its effect lands (`backup_plugin_write_file_fenced`),
/// which refuses a lower token. When the claim stops being held while `op` runs (lease
/// renewals failed, the process stalled, another caller took the key over) and `op` then
/// succeeds, the call returns BACKUP_ERROR_LEASE_LOST: the effect may have been applied late
/// and must be fenced downstream. `op`'s own failure code is returned as it is.
#[no_mangle]
pub extern "C" fn backup_execute_idempotent_fenced(
    key: *const c_char,
    fingerprint: *const c_void,
    fingerprint_len: usize,
    op: backup_fenced_op_fn,
    user_data: *mut c_void,
    replayed_out: *mut bool,
) -> i32 {
    let run =
        |plugin: &backup_coordinator_core::plugin::Plugin, key: &[u8], fp: &[u8], op: FencedOp| {
            plugin.execute_idempotent_fenced(key, fp, |token| {
                // SAFETY: the host's function with the host's pointer, as the contract says.
                match unsafe { op(user_data, token) } {
                    0 => Ok(()),
                    code => Err(backup_coordinator_core::error::Error::Host(code)),
                }
            })
        };
    // SAFETY: the caller's pointers, as this export's contract says.
    unsafe { keyed_call(key, fingerprint, fingerprint_len, op, replayed_out, run) }
}

/// Whether the claim `fencing_token` may still commit the effect of `key`'s operation
/// (docs/C_API.md §8.1); an `op` calls it before committing. BACKUP_SUCCESS while that claim
/// holds the key and its lease is sure to last at least one renewal period more (judged
/// on a monotonic clock from when the last renewal the store acknowledged was sent);
/// BACKUP_ERROR_LEASE_LOST when the lease may have lapsed (renewals failed, the owner
/// stalled) or another claim took over; BACKUP_ERROR_IDEMPOTENCY_CONFLICT when another claim
/// completed the key. A key completed by this very claim answers BACKUP_SUCCESS. Token 0,
/// or a key not of 1 to 255 bytes: BACKUP_ERROR_INVALID_PARAM. Needs an initialized plugin.
#[no_mangle]
pub extern "C" fn backup_idempotency_check_claim(key: *const c_char, fencing_token: u64) -> i32 {
    frame::unbooked(
        // SAFETY: key NUL-terminated.
        || unsafe { key_arg(key) },
        |plugin, key| done(plugin.check_claim(key, fencing_token)),
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
