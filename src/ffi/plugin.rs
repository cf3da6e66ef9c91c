//! Exports of ABI §4: the process-wide plugin instance taosX drives.

use super::coordinator::{copy_history, history_args_valid};
use super::guard::{c_message, c_path, c_slice, code_of, ffi_guard, null_arg, return_string};
use super::retry::BackupOperationFn;
use super::types::SBackupErrorRecord;
use crate::error::{ErrorCode, Failure};
use crate::plugin::{self, Plugin};
use std::ffi::{c_char, c_void};
use std::sync::Arc;

/// Largest config accepted; a taosX plugin section is a few hundred bytes.
const MAX_CONFIG_BYTES: u32 = 1 << 20;

/// The plugin's name (static).
#[no_mangle]
pub extern "C" fn backup_plugin_name() -> *const c_char {
    c"incremental_bitmap_backup".as_ptr()
}

/// The plugin's version (static).
#[no_mangle]
pub extern "C" fn backup_plugin_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// Initializes the process-wide instance from `config_len` bytes of TOML at `config` (not
/// necessarily NUL-terminated; NULL with length 0, or blank text, means all defaults).
/// Invalid config: BACKUP_ERROR_INVALID_PARAM, and the last error names the key and value.
/// Already initialized: BACKUP_ERROR_INIT_FAILED.
#[no_mangle]
pub extern "C" fn backup_plugin_init(config: *const c_char, config_len: u32) -> i32 {
    ffi_guard!(ErrorCode::Unknown.raw(), {
        let bytes: &[u8] = if config.is_null() {
            if config_len > 0 {
                return plugin::fail_init(format!(
                    "Invalid parameter: `config` is NULL with a length of {config_len}"
                ))
                .code;
            }
            &[]
        } else if config_len > MAX_CONFIG_BYTES {
            return plugin::fail_init(format!(
                "Invalid parameter: config is {config_len} bytes, more than the {MAX_CONFIG_BYTES} accepted"
            ))
            .code;
        } else {
            // SAFETY: the caller passes config_len readable bytes.
            unsafe { std::slice::from_raw_parts(config as *const u8, config_len as usize) }
        };
        code_of(&plugin::init(bytes))
    })
}

/// Removes the instance: every wait in progress wakes and its call returns
/// BACKUP_ERROR_CANCELLED; the error log is flushed. Init may be called again afterwards.
#[no_mangle]
pub extern "C" fn backup_plugin_cleanup() {
    ffi_guard!((), { plugin::cleanup() })
}

/// "Success" when no error is recorded; "Plugin not initialized" before init and after
/// cleanup, except that a failed init leaves its reason until the next init or cleanup.
/// Valid until this thread's next call into the plugin.
#[no_mangle]
pub extern "C" fn backup_plugin_get_last_error() -> *const c_char {
    ffi_guard!(ErrorCode::Unknown.message_cstr().as_ptr(), {
        return_string(&plugin::last_error_text())
    })
}

/// Errors recorded and retries performed since init (zeros when not initialized).
/// Either output may be NULL.
#[no_mangle]
pub extern "C" fn backup_plugin_get_error_stats(error_count: *mut u64, retry_count: *mut u64) {
    ffi_guard!((), {
        let (errors, retries) = plugin::instance()
            .map(|p| p.tracker().stats())
            .unwrap_or((0, 0));
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

/// Forgets the last error; the counts and the history stay.
#[no_mangle]
pub extern "C" fn backup_plugin_clear_error() {
    ffi_guard!((), {
        if let Ok(plugin) = plugin::instance() {
            plugin.tracker().clear();
        }
    })
}

/// Records an error (NULL message: the code's own message): counted, kept as the last
/// error and in the history, appended to the error log when one is configured.
/// A no-op before init.
#[no_mangle]
pub extern "C" fn backup_plugin_record_error(code: i32, message: *const c_char) {
    ffi_guard!((), {
        if let Ok(plugin) = plugin::instance() {
            // SAFETY: message is NULL or NUL-terminated.
            let message = unsafe { c_message(message) };
            plugin.record_error(code, message.as_deref());
        }
    })
}

/// `backup_write_file_with_retry` of ABI §3 under the configured policy.
#[no_mangle]
pub extern "C" fn backup_plugin_write_file_with_retry(
    path: *const c_char,
    data: *const c_void,
    size: usize,
) -> i32 {
    ffi_guard!(ErrorCode::Unknown.raw(), {
        // SAFETY: path NUL-terminated; data valid for size bytes.
        let args = unsafe { c_path(path, "path") }
            .and_then(|path| Ok((path, unsafe { c_slice(data as *const u8, size, "data") }?)));
        with_plugin(args, |plugin, (path, bytes)| plugin.write_file(path, bytes))
    })
}

/// Runs `op(user_data)` under the configured retry policy (`error_retry_*` keys).
#[no_mangle]
pub extern "C" fn backup_plugin_execute_with_retry(
    op: BackupOperationFn,
    user_data: *mut c_void,
) -> i32 {
    ffi_guard!(ErrorCode::Unknown.raw(), {
        let op = op.ok_or_else(|| null_arg("op"));
        with_plugin(op, |plugin, op| plugin.execute(host_op(op, user_data)))
    })
}

/// Copies the plugin's most recent errors, newest first (see `backup_get_error_history`).
#[no_mangle]
pub extern "C" fn backup_plugin_get_error_history(
    out: *mut SBackupErrorRecord,
    capacity: u32,
    count_out: *mut u32,
) -> i32 {
    ffi_guard!(ErrorCode::Unknown.raw(), {
        if !history_args_valid(out, capacity, count_out) {
            return ErrorCode::InvalidParam.raw();
        }
        match plugin::instance() {
            // SAFETY: pointers checked above; out valid for capacity records.
            Ok(plugin) => unsafe { copy_history(plugin.tracker(), out, capacity, count_out) },
            Err(failure) => failure.code,
        }
    })
}

/// The error log file lines currently go to, or NULL when there is none yet. Valid until
/// this thread's next call into the plugin.
#[no_mangle]
pub extern "C" fn backup_plugin_get_error_log_path() -> *const c_char {
    ffi_guard!(std::ptr::null(), {
        match plugin::instance().ok().and_then(|p| p.error_log_path()) {
            Some(path) => return_string(&path.to_string_lossy()),
            None => std::ptr::null(),
        }
    })
}

/// The host's operation as an attempt of the retry core.
pub(crate) fn host_op(
    op: unsafe extern "C" fn(*mut c_void) -> i32,
    user_data: *mut c_void,
) -> impl FnMut(u32) -> Result<(), Failure> {
    move |_| {
        // SAFETY: the host's function with the host's pointer, as the contract says.
        match unsafe { op(user_data) } {
            0 => Ok(()),
            code => Err(Failure::from_code(code)),
        }
    }
}

/// The frame of every plugin-level operation: parameter checks first, then init; the call
/// is booked (one error when it fails) whenever an instance exists.
pub(crate) fn with_plugin<A>(
    args: Result<A, Failure>,
    op: impl FnOnce(&Arc<Plugin>, A) -> Result<(), Failure>,
) -> i32 {
    let plugin = plugin::instance();
    let args = match args {
        Ok(args) => args,
        Err(failure) => {
            if let Ok(plugin) = &plugin {
                plugin.account(0, &Err(failure.clone()));
            }
            return failure.code;
        }
    };
    match plugin {
        Ok(plugin) => code_of(&op(&plugin, args)),
        Err(failure) => failure.code,
    }
}

/// The frame of the plugin's calls that are not plugin-level operations (forget, reset,
/// reading retry records): parameter checks first, then init; a failure becomes the last
/// error (naming the problem, `state_dir` included) without being booked in `error_count`.
pub(crate) fn with_plugin_unbooked<A>(
    args: Result<A, Failure>,
    op: impl FnOnce(&Arc<Plugin>, A) -> Result<(), Failure>,
) -> i32 {
    let plugin = plugin::instance();
    let result = args.and_then(|args| match &plugin {
        Ok(plugin) => op(plugin, args),
        Err(failure) => Err(failure.clone()),
    });
    if let (Err(failure), Ok(plugin)) = (&result, &plugin) {
        plugin.tracker().set_last_error(&failure.detail);
    }
    code_of(&result)
}

/// The plugin's counters as Prometheus text, each family one group (HELP, TYPE, samples):
/// errors, retries, error-log write failures; by log-backup command: retries (by reason),
/// recoveries, skips, state syncs (by observed state), the retry-duration histogram; of
/// idempotency keys: claims, replays, conflicts, in-progress rejections, take-overs; of the
/// state store: errors by code, failovers, unknown outcomes (README "Metrics"). `*len_out`
/// receives the text's length (NUL excluded); the text and a NUL are copied when
/// `capacity` is larger than that, else BACKUP_ERROR_INVALID_PARAM (call again with a
/// buffer of `*len_out + 1`).
#[no_mangle]
pub extern "C" fn backup_plugin_get_metrics(
    buffer: *mut c_char,
    capacity: usize,
    len_out: *mut usize,
) -> i32 {
    ffi_guard!(ErrorCode::Unknown.raw(), {
        if len_out.is_null() {
            return ErrorCode::InvalidParam.raw();
        }
        let text = match plugin::instance() {
            Ok(plugin) => plugin.metrics_text(),
            Err(failure) => return failure.code,
        };
        // SAFETY: len_out non-NULL; buffer valid for capacity bytes when non-NULL.
        unsafe {
            *len_out = text.len();
            if buffer.is_null() || capacity <= text.len() {
                return ErrorCode::InvalidParam.raw();
            }
            std::ptr::copy_nonoverlapping(text.as_ptr(), buffer as *mut u8, text.len());
            *buffer.add(text.len()) = 0;
        }
        ErrorCode::Success.raw()
    })
}
