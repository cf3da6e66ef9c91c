//! Exports of C_API §7: log-backup commands checked against the task's state and retried
//! with records that survive a restart.
#![allow(non_camel_case_types)]

use super::frame::{self, required, ArgError};
use super::guard::{c_str, copy_to_buffer, non_null};
use super::plugin::done;
use super::types::{CBool, BACKUP_SUCCESS};
use backup_coordinator_core::error::{Error, Result};
use backup_coordinator_core::log_backup::runner::{LogRetryPolicy, TaskDriver};
use backup_coordinator_core::log_backup::{decide, KernelState, SubCommand};
use std::ffi::{c_char, c_void};

/// `ELogBackupKernelState` as C passes it (see the enum in the header).
pub type ELogBackupKernelState = i32;
/// `ELogSubCommand` as C passes it (see the enum in the header).
pub type ELogSubCommand = i32;

/// Longest task name, in bytes.
pub const BACKUP_LOG_TASK_MAX: usize = 255;

/// Longest reason kept, NUL excluded (the C record has 256 bytes).
pub const MAX_REASON_BYTES: usize = 255;
// The header's figure is the core's (cbindgen reads only this crate, so it is written here).
const _: () =
    assert!(MAX_REASON_BYTES == backup_coordinator_core::log_backup::records::MAX_REASON_BYTES);

/// What to do with a command in an observed state.
#[repr(C)]
pub struct SLogBackupDecision {
    /// The command's effect is already there.
    pub should_skip: bool,
    /// The observed state disagrees with the command.
    pub need_sync: bool,
    /// ELogSubCommand to run, or -1 for none.
    pub actual_command: i32,
}

/// Reports the task's state; `truncated_out`: whether the truncate target is already
/// reached (read only for TRUNCATE). Returns 0 or an error code (retryable codes are retried).
pub type backup_log_query_state_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        state_out: *mut ELogBackupKernelState,
        truncated_out: *mut bool,
    ) -> i32,
>;
/// Runs a command on the task; returns 0 or an error code.
pub type backup_log_execute_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, command: ELogSubCommand) -> i32>;

/// A zero field takes its default.
#[repr(C)]
pub struct SLogBackupRetryPolicy {
    /// Default 5.
    pub max_retry_times: u32,
    /// Default 30000; wait n = min << (n-1).
    pub min_retry_duration_ms: u64,
    /// Cap of one wait; default 480000.
    pub max_retry_duration_ms: u64,
    /// Default 1800000, from the first detected failure.
    pub retry_timeout_ms: u64,
}

#[repr(C)]
pub struct SLogBackupRetryRecord {
    pub retry_num: u32,
    pub detect_failed_at_ms: u64,
    pub expected_retry_at_ms: u64,
    /// 0 until the retry ran.
    pub real_retry_at_ms: u64,
    pub reason_code: i32,
    /// NUL-terminated, truncated.
    pub original_reason: [c_char; 256],
}

fn command_arg(raw: ELogSubCommand) -> Result<SubCommand, ArgError> {
    SubCommand::from_raw(raw).ok_or_else(|| ArgError::Invalid {
        name: "command",
        problem: format!("is {raw}, not an ELogSubCommand"),
    })
}

fn state_arg(raw: ELogBackupKernelState) -> Result<KernelState, ArgError> {
    KernelState::from_raw(raw).ok_or_else(|| ArgError::Invalid {
        name: "state",
        problem: format!("is {raw}, not an ELogBackupKernelState"),
    })
}

/// # Safety
/// `task` is NULL or NUL-terminated.
unsafe fn task_arg<'a>(task: *const c_char) -> Result<&'a str, ArgError> {
    // SAFETY: `task` is NULL or NUL-terminated (this function's contract).
    let task = unsafe { c_str(task, "task") }?;
    if task.is_empty() || task.len() > BACKUP_LOG_TASK_MAX {
        return Err(ArgError::Invalid {
            name: "task",
            problem: format!(
                "must be 1 to {BACKUP_LOG_TASK_MAX} bytes, got {}",
                task.len()
            ),
        });
    }
    Ok(task)
}

/// The (task, command) of a records call.
///
/// # Safety
/// `task` is NULL or NUL-terminated.
unsafe fn records_key<'a>(
    task: *const c_char,
    command: ELogSubCommand,
) -> Result<(&'a str, SubCommand), ArgError> {
    // SAFETY: `task` is NULL or NUL-terminated (this function's contract).
    Ok((unsafe { task_arg(task) }?, command_arg(command)?))
}

/// The decision table: what `command` means for a task observed in `state`. Returns
/// BACKUP_SUCCESS for every valid pair; INVALID_PARAM for an out-of-range value or NULL out.
#[no_mangle]
pub extern "C" fn backup_log_check_idempotency(
    command: ELogSubCommand,
    state: ELogBackupKernelState,
    already_truncated: bool,
    out: *mut SLogBackupDecision,
) -> i32 {
    frame::pure(|| {
        let (command, state) = (command_arg(command)?, state_arg(state)?);
        let out = non_null(out, "out")?;
        let decision = decide(command, state, already_truncated);
        // SAFETY: non-NULL, caller-owned.
        unsafe {
            out.write(SLogBackupDecision {
                should_skip: decision.should_skip,
                need_sync: decision.need_sync,
                actual_command: decision.actual.map_or(-1, |c| c as i32),
            });
        }
        Ok(BACKUP_SUCCESS)
    })
}

/// The host's task, driven through its callbacks.
struct HostTask {
    query: unsafe extern "C" fn(*mut c_void, *mut ELogBackupKernelState, *mut bool) -> i32,
    execute: unsafe extern "C" fn(*mut c_void, ELogSubCommand) -> i32,
    user_data: *mut c_void,
}

impl TaskDriver for HostTask {
    fn query(&mut self) -> Result<(KernelState, bool)> {
        let mut state: ELogBackupKernelState = -1;
        // The host writes a C `bool`, whatever byte that is: read back as a byte.
        let mut truncated = CBool::FALSE;
        let truncated_out = (&raw mut truncated).cast::<bool>();
        // SAFETY: the host's callback with the host's pointer and two valid out-pointers
        // (`CBool` is one byte, like the C `bool` the callback writes).
        let code = unsafe { (self.query)(self.user_data, &mut state, truncated_out) };
        let truncated = truncated.get();
        if code != 0 {
            return Err(Error::HostCall {
                what: "state query".to_string(),
                code,
            });
        }
        KernelState::from_raw(state)
            .map(|s| (s, truncated))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "the state query reported {state}, not an ELogBackupKernelState"
                ))
            })
    }

    fn execute(&mut self, command: SubCommand) -> i32 {
        // SAFETY: the host's callback with the host's pointer.
        unsafe { (self.execute)(self.user_data, command as i32) }
    }
}

/// Queries the task, decides, skips or runs the right command, and retries failures with
/// `policy` (NULL: defaults), persisting the retry records under `state_dir` before each wait.
/// Needs an initialized plugin with a `state_dir`. See C_API §7 for every outcome.
#[no_mangle]
pub extern "C" fn backup_log_run_command(
    task: *const c_char,
    command: ELogSubCommand,
    policy: *const SLogBackupRetryPolicy,
    query: backup_log_query_state_fn,
    execute: backup_log_execute_fn,
    user_data: *mut c_void,
) -> i32 {
    frame::booked(
        || {
            // SAFETY: task NUL-terminated.
            let task = unsafe { task_arg(task) }?;
            let command = command_arg(command)?;
            let query = required(query, "query")?;
            let execute = required(execute, "execute")?;
            // SAFETY: `policy` is NULL or points to a policy of four integers (any bytes valid).
            let policy = match unsafe { policy.as_ref() } {
                None => LogRetryPolicy::default(),
                Some(p) => LogRetryPolicy::from_raw(
                    p.max_retry_times,
                    p.min_retry_duration_ms,
                    p.max_retry_duration_ms,
                    p.retry_timeout_ms,
                ),
            };
            Ok((
                task,
                command,
                policy,
                HostTask {
                    query,
                    execute,
                    user_data,
                },
            ))
        },
        |plugin, (task, command, policy, mut host)| {
            done(plugin.run_log_command(task, command, &policy, &mut host))
        },
    )
}

/// Copies the retry records of (task, command): min(total, capacity) of them, oldest first;
/// `*count_out` is the total.
#[no_mangle]
pub extern "C" fn backup_log_get_retry_records(
    task: *const c_char,
    command: ELogSubCommand,
    out: *mut SLogBackupRetryRecord,
    capacity: u32,
    count_out: *mut u32,
) -> i32 {
    frame::unbooked(
        || {
            // SAFETY: task NUL-terminated.
            let key = unsafe { records_key(task, command) }?;
            non_null(count_out, "count_out")?;
            if out.is_null() && capacity > 0 {
                return Err(ArgError::Null("out"));
            }
            Ok(key)
        },
        |plugin, (task, command)| {
            let sequence = plugin.log_retry_records(task, command)?;
            // SAFETY: count_out non-NULL; out valid for `capacity` records.
            unsafe {
                *count_out = sequence.records.len() as u32;
                for (i, r) in sequence.records.iter().take(capacity as usize).enumerate() {
                    let slot = &mut *out.add(i);
                    slot.retry_num = r.retry_num;
                    slot.detect_failed_at_ms = r.detect_failed_at_ms;
                    slot.expected_retry_at_ms = r.expected_retry_at_ms;
                    slot.real_retry_at_ms = r.real_retry_at_ms;
                    slot.reason_code = r.reason_code;
                    copy_to_buffer(&r.original_reason, &mut slot.original_reason);
                }
            }
            Ok(BACKUP_SUCCESS)
        },
    )
}

/// Removes the records of (task, command), abandoning an unfinished sequence.
#[no_mangle]
pub extern "C" fn backup_log_reset_retry_records(
    task: *const c_char,
    command: ELogSubCommand,
) -> i32 {
    frame::unbooked(
        // SAFETY: task NUL-terminated.
        || unsafe { records_key(task, command) },
        |plugin, (task, command)| done(plugin.reset_log_retry_records(task, command)),
    )
}
