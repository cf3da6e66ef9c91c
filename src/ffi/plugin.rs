//! Exports of C_API §4: the process-wide plugin instance taosX drives.

use super::coordinator::{copy_history, history_args};
use super::frame::{self, required, ArgError, Nullable};
use super::guard::{c_file_path, c_message, c_slice, non_null, return_string, write_optional};
use super::retry::BackupOperationFn;
use super::types::{SBackupErrorRecord, BACKUP_ERROR_INVALID_PARAM, BACKUP_SUCCESS};
use backup_coordinator_core::error::{Error, Result};
use backup_coordinator_core::plugin;
use std::ffi::{c_char, c_void};

/// Largest config accepted; a taosX plugin section is a few hundred bytes.
const MAX_CONFIG_BYTES: u32 = 1 << 20;

/// The plugin's name (static).
#[no_mangle]
pub extern "C" fn backup_plugin_name() -> *const c_char {
    frame::pure(|| Ok(c"incremental_bitmap_backup".as_ptr()))
}

/// The plugin's version (static).
#[no_mangle]
pub extern "C" fn backup_plugin_version() -> *const c_char {
    frame::pure(|| Ok(concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char))
}

/// Initializes the process-wide instance from `config_len` bytes of TOML at `config` (not
/// necessarily NUL-terminated; NULL with length 0, or blank text, means all defaults).
/// Invalid config: BACKUP_ERROR_INVALID_PARAM, and the last error names the key and value.
/// Already initialized: BACKUP_ERROR_INIT_FAILED.
#[no_mangle]
pub extern "C" fn backup_plugin_init(config: *const c_char, config_len: u32) -> i32 {
    frame::pure(|| {
        // An argument that fails is the failed init's reason, like a bad key.
        // SAFETY: the caller passes `config_len` readable bytes at `config`.
        let bytes = unsafe { config_arg(config, config_len) }
            .map_err(|err| plugin::fail_init(err.into()))?;
        plugin::init(bytes)?;
        Ok(BACKUP_SUCCESS)
    })
}

/// # Safety
/// `config` is NULL or valid for `config_len` bytes.
unsafe fn config_arg<'a>(config: *const c_char, config_len: u32) -> Result<&'a [u8], ArgError> {
    if config_len > MAX_CONFIG_BYTES {
        return Err(ArgError::TooLong {
            name: "config",
            len: config_len as usize,
            max: MAX_CONFIG_BYTES as usize,
        });
    }
    // SAFETY: NULL only with a length of 0, else valid for `config_len` bytes (the contract).
    unsafe { c_slice(config as *const u8, config_len as usize, "config") }
}

/// Removes the instance: every wait in progress wakes and its call returns
/// BACKUP_ERROR_CANCELLED; the error log is flushed. Init may be called again afterwards.
#[no_mangle]
pub extern "C" fn backup_plugin_cleanup() {
    frame::pure(|| {
        plugin::cleanup();
        Ok(())
    })
}

/// "Success" when no error is recorded; "Plugin not initialized" before init and after
/// cleanup, except that a failed init leaves its reason until the next init or cleanup.
/// Valid until this thread's next call into the plugin.
#[no_mangle]
pub extern "C" fn backup_plugin_get_last_error() -> *const c_char {
    frame::pure(|| Ok(return_string(&plugin::last_error_text())))
}

/// Errors recorded and retries performed since init (zeros when not initialized).
/// Either output may be NULL.
#[no_mangle]
pub extern "C" fn backup_plugin_get_error_stats(error_count: *mut u64, retry_count: *mut u64) {
    frame::pure(|| {
        let (errors, retries) = plugin::instance()
            .map(|p| p.tracker().stats())
            .unwrap_or((0, 0));
        // SAFETY: each output is NULL or writable.
        unsafe {
            write_optional(error_count, errors);
            write_optional(retry_count, retries);
        }
        Ok(())
    })
}

/// Forgets the last error; the counts and the history stay.
#[no_mangle]
pub extern "C" fn backup_plugin_clear_error() {
    frame::pure(|| {
        if let Ok(plugin) = plugin::instance() {
            plugin.tracker().clear();
        }
        Ok(())
    })
}

/// Records an error (NULL message: the code's own message): counted, kept as the last
/// error and in the history, appended to the error log when one is configured.
/// A no-op before init.
#[no_mangle]
pub extern "C" fn backup_plugin_record_error(code: i32, message: *const c_char) {
    // Recording is this call's purpose, not a failure of it: it needs no frame that books.
    frame::pure(|| {
        if let Ok(plugin) = plugin::instance() {
            // SAFETY: message is NULL or NUL-terminated.
            let message = unsafe { c_message(message) };
            plugin.record_error(code, message.as_deref());
        }
        Ok(())
    })
}

/// `backup_write_file_with_retry` of C_API §3 under the configured policy.
#[no_mangle]
pub extern "C" fn backup_plugin_write_file_with_retry(
    path: *const c_char,
    data: *const c_void,
    size: usize,
) -> i32 {
    frame::booked(
        // SAFETY: path NUL-terminated; data valid for size bytes.
        || unsafe {
            Ok((
                c_file_path(path, "path")?,
                c_slice(data as *const u8, size, "data")?,
            ))
        },
        |plugin, (path, bytes)| done(plugin.write_file(path, bytes)),
    )
}

/// `backup_plugin_write_file_with_retry`, made only if no write of `file_path` with a
/// higher `fencing_token` was made. The token of the last write is kept beside the file
/// (`.<name>.fence`, surviving crashes and restarts); the check and the replacement are
/// atomic against every other fenced writer of the file, on this host or on a shared file
/// system that honours POSIX locks. A lower token: BACKUP_ERROR_FENCED, the file untouched,
/// not retried. An equal token rewrites (a retry of the same claim). A token of 0, a NULL
/// or empty `file_path`, or one that names no file: BACKUP_ERROR_INVALID_PARAM.
/// A fence file that cannot be read as a token: BACKUP_ERROR_DATA_CORRUPTION.
#[no_mangle]
pub extern "C" fn backup_plugin_write_file_fenced(
    file_path: *const c_char,
    data: *const c_void,
    data_len: usize,
    fencing_token: u64,
) -> i32 {
    frame::booked(
        // SAFETY: file_path NUL-terminated; data valid for data_len bytes.
        || unsafe {
            let path = c_file_path(file_path, "file_path")?;
            let bytes = c_slice(data as *const u8, data_len, "data")?;
            if fencing_token == 0 {
                return Err(ArgError::Invalid {
                    name: "fencing_token",
                    problem: "is 0; tokens start at 1".to_string(),
                });
            }
            Ok((path, bytes))
        },
        |plugin, (path, bytes)| done(plugin.write_file_fenced(path, bytes, fencing_token)),
    )
}

/// Runs `op(user_data)` under the configured retry policy (`error_retry_*` keys).
#[no_mangle]
pub extern "C" fn backup_plugin_execute_with_retry(
    op: BackupOperationFn,
    user_data: *mut c_void,
) -> i32 {
    frame::booked(
        || required(op, "op"),
        |plugin, op| done(plugin.execute(host_op(op, user_data))),
    )
}

/// Copies the plugin's most recent errors, newest first (see `backup_get_error_history`).
#[no_mangle]
pub extern "C" fn backup_plugin_get_error_history(
    out: *mut SBackupErrorRecord,
    capacity: u32,
    count_out: *mut u32,
) -> i32 {
    frame::unbooked(
        || history_args(out, capacity, count_out),
        // SAFETY: pointers checked; out valid for capacity records.
        |plugin, (out, count_out)| unsafe {
            copy_history(plugin.tracker(), out, capacity, count_out);
            Ok(BACKUP_SUCCESS)
        },
    )
}

/// The error log file lines currently go to, or NULL when there is none yet. Valid until
/// this thread's next call into the plugin.
#[no_mangle]
pub extern "C" fn backup_plugin_get_error_log_path() -> *const c_char {
    frame::pure(|| {
        Ok(Nullable(
            match plugin::instance().ok().and_then(|p| p.error_log_path()) {
                Some(path) => return_string(&path.to_string_lossy()),
                None => std::ptr::null(),
            },
        ))
    })
    .0
}

/// The host's operation as an attempt of the retry core.
pub(crate) fn host_op(
    op: unsafe extern "C" fn(*mut c_void) -> i32,
    user_data: *mut c_void,
) -> impl FnMut(u32) -> Result<()> {
    move |_| {
        // SAFETY: the host's function with the host's pointer, as the contract says.
        match unsafe { op(user_data) } {
            0 => Ok(()),
            code => Err(Error::Host(code)),
        }
    }
}

/// BACKUP_SUCCESS for an operation that succeeded.
pub(crate) fn done(result: Result<()>) -> Result<i32> {
    result.map(|()| BACKUP_SUCCESS)
}

/// The plugin's counters as Prometheus text, each family one group (HELP, TYPE, samples):
/// errors, retries, retried work that gave up, error-log write failures; by log-backup
/// command: retries (by reason), recoveries, skips, state syncs (by observed state), the
/// retry-duration histogram; of idempotency keys: claims, replays, conflicts, in-progress
/// rejections, take-overs; of the state store: errors by code, failovers, unknown outcomes;
/// with `metrics_textfile` set, its failed rewrites (README "Metrics"). `*len_out`
/// receives the text's length (NUL excluded); the text and a NUL are copied when
/// `capacity` is larger than that, else BACKUP_ERROR_INVALID_PARAM (call again with a
/// buffer of `*len_out + 1`).
#[no_mangle]
pub extern "C" fn backup_plugin_get_metrics(
    buffer: *mut c_char,
    capacity: usize,
    len_out: *mut usize,
) -> i32 {
    frame::unbooked(
        || non_null(len_out, "len_out"),
        |plugin, len_out| {
            let text = plugin.metrics_text();
            // SAFETY: len_out non-NULL; buffer valid for capacity bytes when non-NULL.
            unsafe {
                *len_out = text.len();
                if buffer.is_null() || capacity <= text.len() {
                    // The size query of the contract, not a failure: the last error stays.
                    return Ok(BACKUP_ERROR_INVALID_PARAM);
                }
                std::ptr::copy_nonoverlapping(text.as_ptr(), buffer as *mut u8, text.len());
                *buffer.add(text.len()) = 0;
            }
            Ok(BACKUP_SUCCESS)
        },
    )
}
