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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

/// Most coordinators the registry holds at once. Only a caller that frees coordinators
/// with `free()` instead of `backup_coordinator_destroy` (against ABI §3) could otherwise
/// grow it without end; at this bound the least recently used caller-allocated entry is
/// dropped (its coordinator keeps its counts, which live in the struct, and loses its
/// history and last error). Library-created entries are never dropped: destroy needs them
/// to know which config strings are the library's.
pub const MAX_REGISTERED_COORDINATORS: usize = 65_536;

struct Registered {
    core: Coordinator,
    /// Created by `backup_coordinator_init`: the config strings are the library's copies.
    library_owned: bool,
    /// Serializes writes to the struct's fields, and holds what they were last seen to be.
    fields: Mutex<Seen>,
    /// Tick of the last use, for the eviction at the bound.
    last_used: AtomicU64,
}

/// The fields of a coordinator as the library last wrote or read them. A struct at a
/// registered address whose fields differ is another coordinator: the registered one was
/// freed without destroy and its memory reused. Its stale entry is dropped, so the new
/// coordinator never inherits another's history, counts or string ownership.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    error_count: u64,
    retry_count: u64,
    last_error_message: usize,
    strings: [usize; 3],
}

impl Seen {
    /// # Safety
    /// `c` is non-NULL and points to a filled coordinator.
    unsafe fn of(c: *const SBackupCoordinator) -> Seen {
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
}

static REGISTRY: LazyLock<Mutex<HashMap<usize, Arc<Registered>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
static TICK: AtomicU64 = AtomicU64::new(0);

/// Coordinators registered now (live ones, and freed ones not yet detected): at most
/// [`MAX_REGISTERED_COORDINATORS`].
pub fn registered_coordinators() -> usize {
    REGISTRY.lock().len()
}

/// What the registry holds for an address.
enum Entry {
    /// The state of this very coordinator.
    Current(Arc<Registered>),
    /// None, or a stale one (removed now). `owns_strings`: the stale entry was the
    /// library's and the struct still holds the library's copies of the config strings, so
    /// the library still owns them (the caller changed a count, not the coordinator).
    Absent { owns_strings: bool },
}

/// The registered state of `c` if it is still the coordinator it was registered for;
/// a stale entry (another coordinator at a freed one's address) is removed.
///
/// # Safety
/// `c` is non-NULL and points to a filled coordinator.
unsafe fn current_entry(
    registry: &mut HashMap<usize, Arc<Registered>>,
    c: *mut SBackupCoordinator,
) -> Entry {
    let Some(state) = registry.get(&(c as usize)).cloned() else {
        return Entry::Absent {
            owns_strings: false,
        };
    };
    let fields = state.fields.lock();
    let seen = *fields;
    // SAFETY: `c` is valid (this function's contract); the field lock is held, so no other
    // call writes the fields being compared (the library writes them only under it).
    let now = unsafe { Seen::of(c) };
    drop(fields);
    if seen == now {
        return Entry::Current(state);
    }
    registry.remove(&(c as usize));
    Entry::Absent {
        owns_strings: state.library_owned && seen.strings == now.strings,
    }
}

/// Room for one more entry: drops the least recently used caller-allocated entry at the
/// bound. False when every entry is library-created (all live, as far as the library knows).
fn make_room(registry: &mut HashMap<usize, Arc<Registered>>) -> bool {
    if registry.len() < MAX_REGISTERED_COORDINATORS {
        return true;
    }
    let oldest = registry
        .iter()
        .filter(|(_, state)| !state.library_owned)
        .min_by_key(|(_, state)| state.last_used.load(Ordering::Relaxed))
        .map(|(address, _)| *address);
    match oldest {
        Some(address) => registry.remove(&address).is_some(),
        None => false,
    }
}

/// The library's state for `c`, created from its fields on first use for a caller-made one.
///
/// # Safety
/// `c` is non-NULL and points to a filled coordinator.
unsafe fn registered(c: *mut SBackupCoordinator) -> Arc<Registered> {
    let mut registry = REGISTRY.lock();
    let tick = TICK.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `c` is valid (this function's contract).
    let owns_strings = match unsafe { current_entry(&mut registry, c) } {
        Entry::Current(state) => {
            state.last_used.store(tick, Ordering::Relaxed);
            return state;
        }
        Entry::Absent { owns_strings } => owns_strings,
    };
    let state = Arc::new(Registered {
        // SAFETY: `c` is valid (this function's contract).
        core: unsafe { core_from_fields(c) },
        library_owned: owns_strings,
        // SAFETY: as above.
        fields: Mutex::new(unsafe { Seen::of(c) }),
        last_used: AtomicU64::new(tick),
    });
    // With no room (every entry a live library coordinator), the state serves this call only.
    if make_room(&mut registry) {
        registry.insert(c as usize, state.clone());
    }
    state
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

/// Copies the tracker's counts and last message into the struct's fields, and notes them
/// as seen.
///
/// # Safety
/// `c` is non-NULL, valid, and `state` is its registered state.
unsafe fn mirror_fields(c: *mut SBackupCoordinator, state: &Registered) {
    let mut seen = state.fields.lock();
    let (errors, retries) = state.core.tracker().stats();
    let last = state.core.tracker().last_error();
    // SAFETY: `c` is valid (this function's contract), and the field lock is held; its
    // message is NULL or the library's.
    unsafe {
        (*c).error_count = errors;
        (*c).retry_count = retries;
        replace_malloc_string(&raw mut (*c).last_error_message, last.as_deref());
        *seen = Seen::of(c);
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
        let mut registry = REGISTRY.lock();
        if !make_room(&mut registry) {
            tracing::warn!(
                "backup_coordinator_init: {MAX_REGISTERED_COORDINATORS} coordinators are live already"
            );
            return std::ptr::null_mut();
        }
        // SAFETY: non-NULL, aligned and caller-owned for the call; every field of the config
        // is valid for any bytes (integers, pointers, and `CBool` bytes, never Rust bools).
        let src = unsafe { &*config };
        // SAFETY: a fresh zeroed allocation of the struct's size (all-zero is a valid
        // coordinator: NULL pointers, zero counts), fully written below before use; the
        // config's strings are NULL or NUL-terminated (the caller's contract).
        unsafe {
            let c = libc::calloc(1, std::mem::size_of::<SBackupCoordinator>())
                as *mut SBackupCoordinator;
            if c.is_null() {
                return std::ptr::null_mut();
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
            let state = Arc::new(Registered {
                core: core_from_fields(c),
                library_owned: true,
                fields: Mutex::new(Seen::of(c)),
                last_used: AtomicU64::new(TICK.fetch_add(1, Ordering::Relaxed)),
            });
            registry.insert(c as usize, state);
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
        // Only the entry of this very coordinator (not a stale one of a coordinator freed
        // without destroy at the same address) decides who owns the config strings.
        let entry = {
            let mut registry = REGISTRY.lock();
            // SAFETY: non-NULL; the caller hands over a filled coordinator.
            let entry = unsafe { current_entry(&mut registry, coordinator) };
            registry.remove(&(coordinator as usize));
            entry
        };
        let (state, library_owned) = match entry {
            Entry::Current(state) => {
                let owned = state.library_owned;
                (Some(state), owned)
            }
            Entry::Absent { owns_strings } => (None, owns_strings),
        };
        if let Some(log) = state.as_ref().and_then(|s| s.core.tracker().log().cloned()) {
            log.flush();
        }
        // SAFETY: the caller hands the coordinator over (non-NULL, allocated with the C
        // allocator by the library or by the caller); config strings are freed only when
        // the library copied them, and the library's own strings always.
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
    ErrorCode::Success.raw()
}
