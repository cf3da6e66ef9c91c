//! Exports of C_API §1-§2: error strings, and retry contexts used directly by a host.
//! These need no `backup_plugin_init` and never touch the plugin's statistics.

use super::frame::{self, required, ArgError};
use super::guard::{non_null, replace_malloc_string};
use super::types::{SRetryContext, SRetryPolicy, BACKUP_SUCCESS};
use backup_coordinator_core::error::{message_of, Error, ErrorCode};
use backup_coordinator_core::retry::{self, Execution, RetryPolicy, RetryProgress, RetryState};
use std::ffi::{c_char, c_void};
use std::time::Duration;

/// An operation of the host: returns 0 on success or an error code.
pub type BackupOperationFn = Option<unsafe extern "C" fn(user_data: *mut c_void) -> i32>;

/// The fixed message of `code` ("Unknown error" for codes outside the table). Static; never NULL.
#[no_mangle]
pub extern "C" fn backup_error_string(code: i32) -> *const c_char {
    frame::pure(|| Ok(frame::code_message(code).as_ptr()))
}

/// Initializes a caller-allocated context: IDLE, no error, no message.
/// Returns BACKUP_ERROR_INVALID_PARAM for NULL.
#[no_mangle]
pub extern "C" fn backup_retry_context_init(
    retry_context: *mut SRetryContext,
    max_retry: u32,
    retry_interval: u32,
) -> i32 {
    frame::pure(|| {
        let retry_context = non_null(retry_context, "retry_context")?;
        // SAFETY: non-NULL, points to caller-owned memory of the right size. Fields are
        // written one by one: the memory may be uninitialized (fresh malloc).
        unsafe {
            std::ptr::write(
                retry_context,
                SRetryContext {
                    current_retry: 0,
                    max_retry,
                    retry_interval,
                    last_retry_time: 0,
                    state: RetryState::Idle as i32,
                    last_error: ErrorCode::Success.raw(),
                    error_message: std::ptr::null_mut(),
                },
            );
        }
        Ok(BACKUP_SUCCESS)
    })
}

/// Frees the context's library-owned message. The context itself is the caller's. NULL: no-op.
#[no_mangle]
pub extern "C" fn backup_retry_context_destroy(retry_context: *mut SRetryContext) {
    frame::pure(|| {
        let retry_context = non_null(retry_context, "retry_context")?;
        // SAFETY: non-NULL context whose message, if any, the library allocated.
        unsafe { replace_malloc_string(&raw mut (*retry_context).error_message, None) };
        Ok(())
    })
}

/// Runs `op(user_data)` with the context's policy: `max_retry` retries, `retry_interval`
/// seconds apart. Returns 0, the first non-retryable code, BACKUP_ERROR_RETRY_EXHAUSTED, or
/// BACKUP_ERROR_CANCELLED (plugin cleanup during a wait). NULL context or op:
/// BACKUP_ERROR_INVALID_PARAM.
#[no_mangle]
pub extern "C" fn backup_execute_with_retry(
    retry_context: *mut SRetryContext,
    op: BackupOperationFn,
    user_data: *mut c_void,
) -> i32 {
    frame::pure_checked(
        || {
            Ok((
                non_null(retry_context, "retry_context")?,
                required(op, "op")?,
            ))
        },
        |(retry_context, op)| {
            // The policy is read from the context only once the first attempt has failed
            // (as the original plugin read `max_retry` at each retry).
            // SAFETY: non-NULL context owned by the caller for the duration of the call;
            // the closure is called only within it.
            let policy = || unsafe { context_policy(retry_context) };
            // SAFETY: as above; `op` and `user_data` are the host's, called as the contract
            // says.
            unsafe { execute_into_context(retry_context, policy, op, user_data) }
        },
    )
}

/// Like `backup_execute_with_retry`, under an extended policy (backoff, cap, jitter, budget).
/// The budget's exhaustion returns BACKUP_ERROR_TIMEOUT. NULL argument or an invalid policy
/// (multiplier not finite, or below 1.0 and not 0): BACKUP_ERROR_INVALID_PARAM. A multiplier
/// of 0, as a zero-initialized policy has, is a fixed interval (1.0).
#[no_mangle]
pub extern "C" fn backup_execute_with_retry_policy(
    retry_context: *mut SRetryContext,
    policy: *const SRetryPolicy,
    op: BackupOperationFn,
    user_data: *mut c_void,
) -> i32 {
    frame::pure(|| {
        let retry_context = non_null(retry_context, "retry_context")?;
        let policy = non_null(policy.cast_mut(), "policy")?;
        let op = required(op, "op")?;
        // SAFETY: non-NULL, aligned and caller-owned for the duration of the call; every
        // field of `SRetryPolicy` is valid for any bytes (integers, an f64, and `jitter` a
        // `CBool` byte, never a Rust bool), so the reference is to a valid value.
        let c_policy = unsafe { &*policy };
        let policy = match from_c_policy(c_policy) {
            Ok(policy) => policy,
            Err(err) => {
                // The context's message is where a direct caller looks for the reason.
                // SAFETY: non-NULL context; its message is NULL or the library's (init).
                unsafe {
                    replace_malloc_string(
                        &raw mut (*retry_context).error_message,
                        Some(&Error::from(err.clone()).to_string()),
                    )
                };
                return Err(err.into());
            }
        };
        // SAFETY: non-NULL caller-owned context, valid for the whole call.
        unsafe { (*retry_context).max_retry = policy.max_retry };
        // SAFETY: as above; `op` and `user_data` are the host's, called as the contract says.
        Ok(unsafe { execute_into_context(retry_context, move || policy, op, user_data) })
    })
}

/// True when `error_code` is retryable and retries remain (`current_retry < max_retry`).
#[no_mangle]
pub extern "C" fn backup_should_retry(retry_context: *mut SRetryContext, error_code: i32) -> bool {
    frame::pure(|| {
        let retry_context = non_null(retry_context, "retry_context")?;
        // SAFETY: non-NULL caller-owned context.
        let (current, max) =
            unsafe { ((*retry_context).current_retry, (*retry_context).max_retry) };
        Ok(backup_coordinator_core::error::is_retryable(error_code) && current < max)
    })
}

/// Waits `retry_interval` seconds (woken at once by `backup_plugin_cleanup`) and sets
/// `last_retry_time`. NULL: no-op.
#[no_mangle]
pub extern "C" fn backup_wait_for_retry(retry_context: *mut SRetryContext) {
    frame::pure(|| {
        let retry_context = non_null(retry_context, "retry_context")?;
        let token = backup_coordinator_core::cancel::token();
        // SAFETY: non-NULL caller-owned context.
        let interval = unsafe { (*retry_context).retry_interval };
        let _ = token.sleep(Duration::from_secs(interval as u64));
        // SAFETY: non-NULL caller-owned context.
        unsafe { (*retry_context).last_retry_time = backup_coordinator_core::clock::unix_ms_now() };
        Ok(())
    })
}

/// The policy a context describes: fixed interval, in seconds.
///
/// # Safety
/// `ctx` is non-NULL and valid.
pub(crate) unsafe fn context_policy(ctx: *const SRetryContext) -> RetryPolicy {
    // SAFETY: `ctx` is non-NULL and valid (this function's contract); two integer fields.
    let (max_retry, interval) = unsafe { ((*ctx).max_retry, (*ctx).retry_interval) };
    RetryPolicy::fixed(max_retry, Duration::from_secs(interval as u64))
}

pub(crate) fn from_c_policy(p: &SRetryPolicy) -> Result<RetryPolicy, ArgError> {
    // A C host that zero-initializes the struct and sets only what it needs (as the other
    // policy structs of the ABI allow) means a fixed interval.
    let multiplier = if p.multiplier == 0.0 {
        1.0
    } else {
        p.multiplier
    };
    if !multiplier.is_finite() || multiplier < 1.0 {
        return Err(ArgError::Invalid {
            name: "policy",
            problem: format!(
                "has a multiplier of {}, not a finite number >= 1.0",
                p.multiplier
            ),
        });
    }
    let ms = Duration::from_millis;
    Ok(RetryPolicy::fixed(p.max_retry, ms(p.initial_interval_ms))
        .with_max_interval((p.max_interval_ms > 0).then(|| ms(p.max_interval_ms)))
        .with_multiplier(multiplier)
        .with_jitter(p.jitter.get())
        .with_timeout((p.timeout_ms > 0).then(|| ms(p.timeout_ms))))
}

/// Mirrors the core's progress into the caller's context as it changes, so that an
/// operation may look at `current_retry` while it runs. The first attempt is inlined here
/// and its success costs a few stores; everything a failure needs is out of line.
///
/// # Safety
/// `ctx` is non-NULL and valid for the whole call.
#[inline(always)]
unsafe fn execute_into_context(
    ctx: *mut SRetryContext,
    policy: impl FnOnce() -> RetryPolicy,
    op: unsafe extern "C" fn(*mut c_void) -> i32,
    user_data: *mut c_void,
) -> i32 {
    let mut progress = RetryProgress::default();
    // SAFETY: `ctx` is non-NULL and valid for the whole call (this function's contract).
    let first = retry::first_attempt(&mut progress, &mut unsafe { mirror(ctx) }, || {
        // SAFETY: the host's function, called with the host's pointer, as the contract says.
        match unsafe { op(user_data) } {
            0 => Ok(()),
            code => Err(code),
        }
    });
    match first {
        Ok(()) => {
            // A success leaves no message: nothing to free unless an earlier call left one.
            // SAFETY: `ctx` is valid (as above).
            if !unsafe { (*ctx).error_message }.is_null() {
                // SAFETY: as above; its message is NULL or the library's malloc'd string.
                unsafe { replace_malloc_string(&raw mut (*ctx).error_message, None) };
            }
            ErrorCode::Success.raw()
        }
        // SAFETY: this function's contract is the one `retry_into_context` needs.
        Err(code) => unsafe { retry_into_context(ctx, &policy(), progress, op, user_data, code) },
    }
}

/// The progress shown in the caller's context.
///
/// # Safety
/// `ctx` is non-NULL and valid while the closure is used.
#[inline(always)]
unsafe fn mirror(ctx: *mut SRetryContext) -> impl FnMut(&RetryProgress) {
    // SAFETY: the caller keeps `ctx` valid while the closure is used (this function's contract).
    move |p: &RetryProgress| unsafe {
        (*ctx).current_retry = p.current_retry;
        (*ctx).state = p.state as i32;
        (*ctx).last_error = p.last_error;
        // Set once a retry has started in this execution; until then the context keeps
        // the time of the previous execution's last retry (and the first attempt's
        // progress costs no load of it).
        if p.current_retry > 0 {
            (*ctx).last_retry_time = p.last_retry_time_ms;
        }
    }
}

/// The retries after a first attempt that failed with `code`.
///
/// # Safety
/// As for [`execute_into_context`].
#[cold]
#[inline(never)]
unsafe fn retry_into_context(
    ctx: *mut SRetryContext,
    policy: &RetryPolicy,
    mut progress: RetryProgress,
    op: unsafe extern "C" fn(*mut c_void) -> i32,
    user_data: *mut c_void,
    code: i32,
) -> i32 {
    let execution = retry::run_now_after(
        policy,
        &mut progress,
        // SAFETY: `ctx` is valid for the whole call (this function's contract).
        unsafe { mirror(ctx) },
        // SAFETY: the host's function, called with the host's pointer, as the contract says.
        |_| match unsafe { op(user_data) } {
            0 => Ok(()),
            code => Err(Error::Host(code)),
        },
        Error::Host(code),
    );
    // SAFETY: `ctx` is valid (as above); its message is NULL or the library's.
    unsafe { finish_context(ctx, &progress, &execution, true) };
    execution.code()
}

/// # Safety
/// `ctx` is non-NULL and valid.
pub(crate) unsafe fn write_progress(ctx: *mut SRetryContext, p: &RetryProgress) {
    // SAFETY: `ctx` is non-NULL and valid (this function's contract); plain field writes.
    unsafe {
        (*ctx).current_retry = p.current_retry;
        (*ctx).state = p.state as i32;
        (*ctx).last_error = p.last_error;
        (*ctx).last_retry_time = p.last_retry_time_ms;
    }
}

/// Final state of an execution: progress (unless the execution already mirrored it live),
/// and the message of the last failed attempt's code (NULL after a success).
///
/// # Safety
/// `ctx` is non-NULL and valid; its message is NULL or library-allocated.
pub(crate) unsafe fn finish_context(
    ctx: *mut SRetryContext,
    p: &RetryProgress,
    execution: &Execution,
    live_mirrored: bool,
) {
    // SAFETY: `ctx` is non-NULL and valid, its message NULL or the library's (this
    // function's contract).
    unsafe {
        if !live_mirrored {
            write_progress(ctx, p);
        }
        let message = match (&execution.result, &execution.last_failure) {
            (Ok(()), _) => None,
            (Err(_), Some(last)) => Some(message_of(last.code())),
            (Err(failure), None) => Some(message_of(failure.code())),
        };
        replace_malloc_string(&raw mut (*ctx).error_message, message);
    }
}
