//! Exports of C_API §3: coordinators, allocated by the library or `malloc`ed by the caller.
//!
//! The core's registry (`super::registry`) holds each coordinator's state by
//! its address and decides who owns the config strings; this module reads and writes the C
//! struct for it. Counters and messages live in the core's tracker and are mirrored into
//! the struct's fields under a per-coordinator lock, so a harness reading the fields sees
//! consistent values.

use super::frame::{self, ArgError, Booking};
use super::guard::{
    c_message, c_path, c_slice, copy_to_buffer, non_null, replace_malloc_string, return_string,
    write_optional,
};
use super::registry::{self, Registered, Seen};
use super::retry::{context_policy, finish_context};
use super::types::{
    SBackupCoordinator, SBackupCoordinatorConfig, SBackupErrorRecord, SBitmapEngine,
    SEventInterceptor, BACKUP_SUCCESS,
};
use backup_coordinator_core::coordinator::{Coordinator, CoordinatorSettings};
use backup_coordinator_core::error::Error;
use backup_coordinator_core::retry::{RetryProgress, RetryState};
use std::ffi::{c_char, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

pub use super::registry::MAX_REGISTERED_COORDINATORS;

/// The name of the coordinator argument of every export here.
pub(crate) const NULL_COORDINATOR: &str = "coordinator";

/// Coordinators registered now (live ones, and freed ones not yet detected): at most
/// [`MAX_REGISTERED_COORDINATORS`].
pub fn registered_coordinators() -> usize {
    registry::global().len()
}

/// What the library last saw of a coordinator's fields.
///
/// # Safety
/// `c` is non-NULL and points to a filled coordinator.
unsafe fn seen(c: *const SBackupCoordinator) -> Seen {
    // SAFETY: `c` is valid (this function's contract); integer and pointer fields only,
    // read in place.
    unsafe {
        Seen {
            error_count: (*c).error_count,
            retry_count: (*c).retry_count,
            last_error_message: (*c).last_error_message as usize,
            strings: [
                (*c).config.encryption_key as usize,
                (*c).config.error_store_path as usize,
                (*c).config.backup_path as usize,
            ],
        }
    }
}

/// A call in progress on a coordinator: its struct and its registered state.
pub(crate) struct CoordinatorCall {
    c: *mut SBackupCoordinator,
    state: Arc<Registered>,
}

impl CoordinatorCall {
    /// The registered state of `c`, adopted from its fields on first use.
    ///
    /// # Safety
    /// `c` is non-NULL and points to a filled coordinator for the whole call.
    pub(crate) unsafe fn enter(c: *mut SBackupCoordinator) -> Self {
        let state = registry::global().lookup(
            c as usize,
            // SAFETY: `c` is valid (this function's contract).
            || unsafe { seen(c) },
            // SAFETY: as above.
            || unsafe { core_from_fields(c) },
        );
        CoordinatorCall { c, state }
    }

    pub(crate) fn core(&self) -> &Coordinator {
        &self.state.core
    }

    pub(crate) fn record_error(&self, code: i32, message: Option<&str>) {
        self.state.core.record_error(code, message);
    }

    pub(crate) fn set_last_error(&self, message: &str) {
        self.state.core.tracker().set_last_error(message);
    }

    /// Copies the tracker's counts and last message into the struct's fields, and notes
    /// them as seen.
    pub(crate) fn mirror(&self) {
        let mut fields = self.state.fields();
        let (errors, retries) = self.core().tracker().stats();
        let last = self.core().tracker().last_error();
        let c = self.c;
        // SAFETY: `c` is valid for the call (`enter`'s contract), and the field lock is
        // held; its message is NULL or the library's.
        unsafe {
            (*c).error_count = errors;
            (*c).retry_count = retries;
            replace_malloc_string(&raw mut (*c).last_error_message, last.as_deref());
            *fields = seen(c);
        }
    }
}

/// # Safety
/// `c` is non-NULL and points to a filled coordinator.
unsafe fn core_from_fields(c: *const SBackupCoordinator) -> Coordinator {
    // SAFETY: `c` is valid (this function's contract); the config's strings are NULL or
    // NUL-terminated, and `enable_error_logging` is read as the byte it is (`CBool`).
    unsafe {
        let config = &raw const (*c).config;
        let settings = CoordinatorSettings {
            error_store_path: optional_path((*config).error_store_path),
            enable_error_logging: (*config).enable_error_logging.get(),
            // Capped at MAX_HISTORY by the tracker, as the plugin's config is.
            error_buffer_size: (*config).error_buffer_size as usize,
            secret: optional_string((*config).encryption_key),
        };
        Coordinator::new(settings, (*c).error_count, (*c).retry_count)
    }
}

/// # Safety
/// `ptr` is NULL or NUL-terminated.
unsafe fn optional_path(ptr: *const c_char) -> Option<PathBuf> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated (this function's contract).
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    (!bytes.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(bytes)))
}

/// # Safety
/// `ptr` is NULL or NUL-terminated.
unsafe fn optional_string(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated (this function's contract).
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    Some(String::from_utf8_lossy(bytes).into_owned())
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
    frame::pure(|| {
        let config = non_null(config.cast_mut(), "config")?;
        // SAFETY: non-NULL, aligned and caller-owned for the call; every field of the config
        // is valid for any bytes (integers, pointers, and `CBool` bytes, never Rust bools).
        let src = unsafe { &*config };
        let created = registry::global().create(|| {
            // SAFETY: the config's strings are NULL or NUL-terminated (the caller's contract).
            let c = unsafe { create(src, bitmap_engine, event_interceptor) }?;
            // SAFETY: `c` was just filled.
            Some((c as usize, unsafe { core_from_fields(c) }, unsafe {
                seen(c)
            }))
        });
        created
            .map(|address| address as *mut SBackupCoordinator)
            .ok_or_else(|| {
                Error::OutOfResources(format!(
                    "out of memory, or {MAX_REGISTERED_COORDINATORS} coordinators are live already"
                ))
            })
    })
}

/// A fresh coordinator with copies of `src`'s strings; NULL when memory runs out.
///
/// # Safety
/// `src`'s strings are NULL or NUL-terminated.
unsafe fn create(
    src: &SBackupCoordinatorConfig,
    bitmap_engine: *mut SBitmapEngine,
    event_interceptor: *mut SEventInterceptor,
) -> Option<*mut SBackupCoordinator> {
    // SAFETY: a fresh zeroed allocation of the struct's size (all-zero is a valid
    // coordinator: NULL pointers, zero counts), fully written below before use; the
    // config's strings are NULL or NUL-terminated (this function's contract).
    unsafe {
        let c =
            libc::calloc(1, std::mem::size_of::<SBackupCoordinator>()) as *mut SBackupCoordinator;
        if c.is_null() {
            return None;
        }
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
        Some(c)
    }
}

/// Frees a coordinator, whoever allocated it (library or caller `malloc`). Config strings
/// are freed only when the library copied them. NULL: no-op.
#[no_mangle]
pub extern "C" fn backup_coordinator_destroy(coordinator: *mut SBackupCoordinator) {
    frame::pure(|| {
        let c = non_null(coordinator, NULL_COORDINATOR)?;
        // SAFETY: non-NULL; the caller hands over a filled coordinator.
        let removed = registry::global().remove(c as usize, || unsafe { seen(c) });
        if let Some(log) = removed
            .state
            .as_ref()
            .and_then(|s| s.core.tracker().log().cloned())
        {
            log.flush();
        }
        // SAFETY: the caller hands the coordinator over (non-NULL, allocated with the C
        // allocator by the library or by the caller); config strings are freed only when
        // the library copied them, and the library's own strings always.
        unsafe {
            if removed.owns_strings {
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
        Ok(())
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
    frame::coordinator(
        coordinator,
        Booking::Counted,
        // SAFETY: message NULL or NUL-terminated.
        || Ok(unsafe { c_message(error_message) }),
        |call, message| {
            call.record_error(error_code, message.as_deref());
            Ok(())
        },
    )
}

/// The last recorded error's message, "Success" when none. Valid until this thread's next
/// call into the library.
#[no_mangle]
pub extern "C" fn backup_get_last_error(coordinator: *mut SBackupCoordinator) -> *const c_char {
    frame::coordinator(
        coordinator,
        Booking::LastError,
        || Ok(()),
        |call, ()| {
            Ok(match call.core().tracker().last_error() {
                Some(last) => return_string(&last),
                None => frame::code_message(BACKUP_SUCCESS).as_ptr(),
            })
        },
    )
}

/// Forgets the last error (counts and history stay) and resets the retry context's
/// error state. NULL: no-op.
#[no_mangle]
pub extern "C" fn backup_clear_error(coordinator: *mut SBackupCoordinator) {
    frame::coordinator(
        coordinator,
        Booking::Counted,
        || Ok(()),
        |call, ()| {
            call.core().tracker().clear();
            let _fields = call.state.fields();
            // SAFETY: the coordinator is valid for the call; written under its field lock;
            // the context's message is NULL or the library's.
            unsafe {
                let ctx = &raw mut (*call.c).retry_context;
                (*ctx).last_error = BACKUP_SUCCESS;
                (*ctx).state = RetryState::Idle as i32;
                replace_malloc_string(&raw mut (*ctx).error_message, None);
            }
            Ok(())
        },
    )
}

/// Errors recorded and retries performed by this coordinator. Either output may be NULL;
/// a NULL coordinator gives zeros.
#[no_mangle]
pub extern "C" fn backup_get_error_stats(
    coordinator: *mut SBackupCoordinator,
    error_count: *mut u64,
    retry_count: *mut u64,
) {
    frame::pure(|| {
        let (errors, retries) = if coordinator.is_null() {
            (0, 0)
        } else {
            // SAFETY: non-NULL coordinator.
            unsafe { CoordinatorCall::enter(coordinator) }
                .core()
                .tracker()
                .stats()
        };
        // SAFETY: each output is NULL or writable.
        unsafe {
            write_optional(error_count, errors);
            write_optional(retry_count, retries);
        }
        Ok(())
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
    frame::coordinator(
        coordinator,
        Booking::Counted,
        // SAFETY: path NUL-terminated; data valid for data_size bytes.
        || unsafe {
            Ok((
                c_path(file_path, "file_path")?,
                c_slice(data as *const u8, data_size, "data")?,
            ))
        },
        |call, (path, bytes)| {
            // SAFETY: the coordinator is valid for the call; its context is the caller's.
            let ctx = unsafe { &raw mut (*call.c).retry_context };
            // SAFETY: as above.
            let policy = unsafe { context_policy(ctx) };
            let mut progress = RetryProgress::default();
            let execution = call.core().write_file(&policy, &mut progress, path, bytes);
            let _fields = call.state.fields();
            // SAFETY: as above, under the field lock; its message NULL or the library's.
            unsafe { finish_context(ctx, &progress, &execution, false) };
            execution.result.map(|()| BACKUP_SUCCESS)
        },
    )
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
    frame::coordinator(
        coordinator,
        Booking::LastError,
        || history_args(out, capacity, count_out),
        |call, (out, count_out)| {
            // SAFETY: arguments checked; out valid for capacity records.
            unsafe { copy_history(call.core().tracker(), out, capacity, count_out) };
            Ok(BACKUP_SUCCESS)
        },
    )
}

/// The arguments of both history accessors: `count_out` is required, `out` only when
/// there is room to fill.
pub(crate) fn history_args(
    out: *mut SBackupErrorRecord,
    capacity: u32,
    count_out: *mut u32,
) -> Result<(*mut SBackupErrorRecord, *mut u32), ArgError> {
    let count_out = non_null(count_out, "count_out")?;
    if out.is_null() && capacity > 0 {
        return Err(ArgError::Null("out"));
    }
    Ok((out, count_out))
}

/// Shared by the coordinator and plugin history accessors.
///
/// # Safety
/// The arguments passed [`history_args`]; `out` is valid for `capacity` records.
pub(crate) unsafe fn copy_history(
    tracker: &backup_coordinator_core::tracker::ErrorTracker,
    out: *mut SBackupErrorRecord,
    capacity: u32,
    count_out: *mut u32,
) {
    let records = tracker.history(capacity as usize);
    // SAFETY: `count_out` is non-NULL and `out` valid for `capacity` records (this
    // function's contract); at most `capacity` records are written.
    unsafe {
        *count_out = tracker.history_len() as u32;
        for (i, record) in records.iter().enumerate() {
            let slot = &mut *out.add(i);
            slot.timestamp_ms = record.unix_ms;
            slot.code = record.code;
            copy_to_buffer(&record.message, &mut slot.message);
        }
    }
}
