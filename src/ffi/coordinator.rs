//! Exports of ABI §3: coordinators, allocated by the library or `malloc`ed by the caller.
//!
//! The C struct has no room for the library's own state, so a registry maps each
//! coordinator's address to it. The registry also says whether the library created the
//! coordinator, which decides who owns the config strings at destroy. Counters and messages
//! live in the core's tracker and are mirrored into the struct's fields under a
//! per-coordinator lock, so a harness reading the fields sees consistent values.

use super::guard::{
    c_message, c_path, c_slice, code_of, copy_to_buffer, ffi_guard, null_arg,
    replace_malloc_string, return_string,
};
use super::retry::{context_policy, finish_context};
use super::types::{
    SBackupCoordinator, SBackupCoordinatorConfig, SBackupErrorRecord, SBitmapEngine,
    SEventInterceptor,
};
use crate::coordinator::{Coordinator, CoordinatorSettings};
use crate::error::ErrorCode;
use crate::retry::{RetryProgress, RetryState};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

struct Registered {
    core: Coordinator,
    /// Created by `backup_coordinator_init`: the config strings are the library's copies.
    library_owned: bool,
    /// Serializes writes to the struct's fields.
    fields: Mutex<()>,
}

static REGISTRY: LazyLock<Mutex<HashMap<usize, Arc<Registered>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The library's state for `c`, created from its fields on first use for a caller-made one.
///
/// # Safety
/// `c` is non-NULL and points to a filled coordinator.
unsafe fn registered(c: *mut SBackupCoordinator) -> Arc<Registered> {
    let mut registry = REGISTRY.lock();
    registry
        .entry(c as usize)
        .or_insert_with(|| {
            Arc::new(Registered {
                core: unsafe { core_from_fields(c) },
                library_owned: false,
                fields: Mutex::new(()),
            })
        })
        .clone()
}

/// # Safety
/// `c` is non-NULL and points to a filled coordinator.
unsafe fn core_from_fields(c: *const SBackupCoordinator) -> Coordinator {
    unsafe {
        let config = &raw const (*c).config;
        let settings = CoordinatorSettings {
            error_store_path: optional_path((*config).error_store_path),
            enable_error_logging: (*config).enable_error_logging.get(),
            error_buffer_size: (*config).error_buffer_size as usize,
            secret: optional_string((*config).encryption_key),
        };
        Coordinator::new(settings, (*c).error_count, (*c).retry_count)
    }
}

unsafe fn optional_path(ptr: *const c_char) -> Option<PathBuf> {
    if ptr.is_null() {
        return None;
    }
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    (!bytes.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(bytes)))
}

unsafe fn optional_string(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    Some(String::from_utf8_lossy(unsafe { CStr::from_ptr(ptr) }.to_bytes()).into_owned())
}

/// Copies the tracker's counts and last message into the struct's fields.
///
/// # Safety
/// `c` is non-NULL, valid, and `state` is its registered state.
unsafe fn mirror_fields(c: *mut SBackupCoordinator, state: &Registered) {
    let _fields = state.fields.lock();
    let (errors, retries) = state.core.tracker().stats();
    let last = state.core.tracker().last_error();
    unsafe {
        (*c).error_count = errors;
        (*c).retry_count = retries;
        replace_malloc_string(&raw mut (*c).last_error_message, last.as_deref());
    }
}

/// Creates a coordinator with copies of the config's strings. `bitmap_engine` and
/// `event_interceptor` may be NULL. Returns NULL for a NULL config or when memory runs out.
/// Free it with `backup_coordinator_destroy`.
#[no_mangle]
pub extern "C" fn backup_coordinator_init(
    config: *const SBackupCoordinatorConfig,
    bitmap_engine: *mut SBitmapEngine,
    event_interceptor: *mut SEventInterceptor,
) -> *mut SBackupCoordinator {
    ffi_guard!(std::ptr::null_mut(), {
        if config.is_null() {
            tracing::warn!("backup_coordinator_init: config is NULL");
            return std::ptr::null_mut();
        }
        // SAFETY: a fresh allocation of the struct's size, fully written before use.
        unsafe {
            let c = libc::calloc(1, std::mem::size_of::<SBackupCoordinator>())
                as *mut SBackupCoordinator;
            if c.is_null() {
                return std::ptr::null_mut();
            }
            let src = &*config;
            let copy = |ptr: *mut c_char| -> *mut c_char {
                if ptr.is_null() {
                    std::ptr::null_mut()
                } else {
                    libc::strdup(ptr)
                }
            };
            let cfg = &raw mut (*c).config;
            (*cfg).max_blocks_per_batch = src.max_blocks_per_batch;
            (*cfg).batch_timeout_ms = src.batch_timeout_ms;
            (*cfg).enable_compression = src.enable_compression;
            (*cfg).enable_encryption = src.enable_encryption;
            (*cfg).encryption_key = copy(src.encryption_key);
            (*cfg).error_retry_max = src.error_retry_max;
            (*cfg).error_retry_interval = src.error_retry_interval;
            (*cfg).error_store_path = copy(src.error_store_path);
            (*cfg).enable_error_logging = src.enable_error_logging;
            (*cfg).error_buffer_size = src.error_buffer_size;
            (*cfg).backup_path = copy(src.backup_path);
            (*cfg).backup_max_size = src.backup_max_size;
            (*cfg).compression_level = src.compression_level;
            (*c).bitmap_engine = bitmap_engine;
            (*c).event_interceptor = event_interceptor;
            super::retry::backup_retry_context_init(
                &raw mut (*c).retry_context,
                src.error_retry_max,
                src.error_retry_interval,
            );
            let state = Arc::new(Registered {
                core: core_from_fields(c),
                library_owned: true,
                fields: Mutex::new(()),
            });
            REGISTRY.lock().insert(c as usize, state);
            c
        }
    })
}

/// Frees a coordinator, whoever allocated it (library or caller `malloc`). Config strings
/// are freed only when the library copied them. NULL: no-op.
#[no_mangle]
pub extern "C" fn backup_coordinator_destroy(coordinator: *mut SBackupCoordinator) {
    ffi_guard!((), {
        if coordinator.is_null() {
            return;
        }
        let state = REGISTRY.lock().remove(&(coordinator as usize));
        let library_owned = state.as_ref().is_some_and(|s| s.library_owned);
        if let Some(log) = state.as_ref().and_then(|s| s.core.tracker().log().cloned()) {
            log.flush();
        }
        // SAFETY: the caller hands the coordinator over; strings are freed by whoever owns them.
        unsafe {
            let c = coordinator;
            if library_owned {
                for field in [
                    &raw mut (*c).config.encryption_key,
                    &raw mut (*c).config.error_store_path,
                    &raw mut (*c).config.backup_path,
                ] {
                    if !(*field).is_null() {
                        // The key is wiped before its memory goes back to the allocator.
                        let len = libc::strlen(*field);
                        std::ptr::write_bytes(*field, 0, len);
                        libc::free(*field as *mut c_void);
                        *field = std::ptr::null_mut();
                    }
                }
            }
            replace_malloc_string(&raw mut (*c).last_error_message, None);
            replace_malloc_string(&raw mut (*c).retry_context.error_message, None);
            libc::free(c as *mut c_void);
        }
    })
}

/// Records an error of the coordinator: counts it, keeps it as the last error and in the
/// history, and appends it to the error log when the config has `error_store_path` and
/// `enable_error_logging`. A NULL message records the code's own message. NULL coordinator: no-op.
#[no_mangle]
pub extern "C" fn backup_record_error(
    coordinator: *mut SBackupCoordinator,
    error_code: i32,
    error_message: *const c_char,
) {
    ffi_guard!((), {
        if coordinator.is_null() {
            return;
        }
        // SAFETY: non-NULL coordinator; message NULL or NUL-terminated.
        unsafe {
            let state = registered(coordinator);
            let message = c_message(error_message);
            state.core.record_error(error_code, message.as_deref());
            mirror_fields(coordinator, &state);
        }
    })
}

/// The last recorded error's message, "Success" when none. Valid until this thread's next
/// call into the library.
#[no_mangle]
pub extern "C" fn backup_get_last_error(coordinator: *mut SBackupCoordinator) -> *const c_char {
    ffi_guard!(ErrorCode::Unknown.message_cstr().as_ptr(), {
        if coordinator.is_null() {
            return c"Invalid parameter: coordinator is NULL".as_ptr();
        }
        // SAFETY: non-NULL coordinator.
        let state = unsafe { registered(coordinator) };
        match state.core.tracker().last_error() {
            Some(last) => return_string(&last),
            None => ErrorCode::Success.message_cstr().as_ptr(),
        }
    })
}

/// Forgets the last error (counts and history stay) and resets the retry context's
/// error state. NULL: no-op.
#[no_mangle]
pub extern "C" fn backup_clear_error(coordinator: *mut SBackupCoordinator) {
    ffi_guard!((), {
        if coordinator.is_null() {
            return;
        }
        // SAFETY: non-NULL coordinator.
        unsafe {
            let state = registered(coordinator);
            state.core.tracker().clear();
            mirror_fields(coordinator, &state);
            let _fields = state.fields.lock();
            (*coordinator).retry_context.last_error = ErrorCode::Success.raw();
            (*coordinator).retry_context.state = RetryState::Idle as i32;
            replace_malloc_string(&raw mut (*coordinator).retry_context.error_message, None);
        }
    })
}

/// Errors recorded and retries performed by this coordinator. Either output may be NULL;
/// a NULL coordinator gives zeros.
#[no_mangle]
pub extern "C" fn backup_get_error_stats(
    coordinator: *mut SBackupCoordinator,
    error_count: *mut u64,
    retry_count: *mut u64,
) {
    ffi_guard!((), {
        let (errors, retries) = if coordinator.is_null() {
            (0, 0)
        } else {
            // SAFETY: non-NULL coordinator.
            unsafe { registered(coordinator) }.core.tracker().stats()
        };
        // SAFETY: each output is NULL or writable.
        unsafe {
            if !error_count.is_null() {
                *error_count = errors;
            }
            if !retry_count.is_null() {
                *retry_count = retries;
            }
        }
    })
}

/// Atomically and durably replaces `file_path` with `data` (temp file, fsync, rename, fsync
/// of the directory), retried under `coordinator->retry_context` (`max_retry`,
/// `retry_interval`). DISK_FULL and PERMISSION_DENIED are not retried. The final failure is
/// recorded as an error of the coordinator. `data` may be NULL only when `data_size` is 0.
#[no_mangle]
pub extern "C" fn backup_write_file_with_retry(
    coordinator: *mut SBackupCoordinator,
    file_path: *const c_char,
    data: *const c_void,
    data_size: usize,
) -> i32 {
    ffi_guard!(ErrorCode::Unknown.raw(), {
        if coordinator.is_null() {
            return ErrorCode::InvalidParam.raw();
        }
        // SAFETY: non-NULL coordinator; path NUL-terminated; data valid for data_size bytes.
        unsafe {
            let state = registered(coordinator);
            let args = c_path(file_path, "file_path")
                .and_then(|path| Ok((path, c_slice(data as *const u8, data_size, "data")?)));
            let (path, bytes) = match args {
                Ok(args) => args,
                Err(failure) => {
                    state.core.record_error(failure.code, Some(&failure.detail));
                    mirror_fields(coordinator, &state);
                    return failure.code;
                }
            };
            let ctx = &raw mut (*coordinator).retry_context;
            let policy = context_policy(ctx);
            let mut progress = RetryProgress::default();
            let execution = state.core.write_file(&policy, &mut progress, path, bytes);
            mirror_fields(coordinator, &state);
            let _fields = state.fields.lock();
            finish_context(ctx, &progress, &execution, false);
            code_of(&execution.result)
        }
    })
}

/// Copies the coordinator's most recent errors, newest first: min(held, capacity) records.
/// `*count_out` receives how many are held. NULL coordinator or count_out, or NULL out with a
/// non-zero capacity: BACKUP_ERROR_INVALID_PARAM.
#[no_mangle]
pub extern "C" fn backup_get_error_history(
    coordinator: *mut SBackupCoordinator,
    out: *mut SBackupErrorRecord,
    capacity: u32,
    count_out: *mut u32,
) -> i32 {
    ffi_guard!(ErrorCode::Unknown.raw(), {
        if coordinator.is_null() {
            return null_arg("coordinator").code;
        }
        if !history_args_valid(out, capacity, count_out) {
            return ErrorCode::InvalidParam.raw();
        }
        // SAFETY: non-NULL coordinator; arguments checked; out valid for capacity records.
        unsafe {
            let state = registered(coordinator);
            copy_history(state.core.tracker(), out, capacity, count_out)
        }
    })
}

/// The argument check of both history accessors: `count_out` is required, `out` only
/// when there is room to fill.
pub(crate) fn history_args_valid(
    out: *const SBackupErrorRecord,
    capacity: u32,
    count_out: *const u32,
) -> bool {
    !count_out.is_null() && (!out.is_null() || capacity == 0)
}

/// Shared by the coordinator and plugin history accessors.
///
/// # Safety
/// The arguments passed [`history_args_valid`]; `out` is valid for `capacity` records.
pub(crate) unsafe fn copy_history(
    tracker: &crate::tracker::ErrorTracker,
    out: *mut SBackupErrorRecord,
    capacity: u32,
    count_out: *mut u32,
) -> i32 {
    let records = tracker.history(capacity as usize);
    unsafe {
        *count_out = tracker.history_len() as u32;
        for (i, record) in records.iter().enumerate() {
            let slot = &mut *out.add(i);
            slot.timestamp_ms = record.unix_ms;
            slot.code = record.code;
            copy_to_buffer(&record.message, &mut slot.message);
        }
    }
    ErrorCode::Success.raw()
}
