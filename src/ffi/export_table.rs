//! The table of every export of the header, and one test per rule of C_API §4 run against
//! every row: NULL arguments, calls before init, booking, panics. A function the header
//! declares that is missing from the table fails the test, so no new export skips the rules.
//!
//! A unit test rather than an integration test: the panic rule needs the frame's fault point,
//! which only a `cfg(test)` build has. The plugin is process-wide, so the rules run in a
//! process of their own (this test binary started again on the one test below).

use super::coordinator::*;
use super::frame::fault;
use super::idempotency::*;
use super::log_backup::*;
use super::plugin::*;
use super::retry::*;
use super::types::*;
use std::collections::BTreeSet;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};

const CHILD: &str = "BACKUP_EXPORT_TABLE_CHILD";

/// How an export meets C_API §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A plugin-level operation: needs init; a failure is one error in `error_count`.
    Booked,
    /// Needs init; a failure is the plugin's last error, never counted.
    Unbooked,
    /// A coordinator's operation: a failure is an error of the coordinator.
    CoordinatorOp,
    /// A coordinator's accessor: a failure is the coordinator's last error, never counted.
    CoordinatorRead,
    /// Records an error by its purpose (counted where it records, nowhere else).
    Record,
    /// Reads or clears the plugin's state; no init needed, never fails.
    Accessor,
    /// Needs no init and never touches the plugin's state.
    Pure,
    /// `backup_plugin_init` and `backup_plugin_cleanup`.
    Lifecycle,
}

/// What an export returned, as the test reads it.
#[derive(Debug, Clone, PartialEq)]
enum Ret {
    Code(i32),
    Void,
    Bool(bool),
    Str(Option<String>),
    Ptr(bool),
}

fn text(ptr: *const c_char) -> Ret {
    // SAFETY: the exports return NULL or a NUL-terminated string valid until this
    // thread's next call.
    Ret::Str((!ptr.is_null()).then(|| unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into()))
}

/// What the calls share: a scratch directory, a coordinator, a retry context, buffers.
struct Fx {
    _dir: tempfile::TempDir,
    file: CString,
    bad_file: CString,
    fenced_file: CString,
    state_dir: String,
    c: *mut SBackupCoordinator,
    ctx: *mut SRetryContext,
    records: *mut SLogBackupRetryRecord,
    history: *mut SBackupErrorRecord,
    count: *mut u32,
    text: *mut c_char,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| CString::new(dir.path().join(name).to_str().unwrap()).unwrap();
        // SAFETY: all-zero is a valid config (NULL strings, zero numbers).
        let mut config: SBackupCoordinatorConfig = unsafe { std::mem::zeroed() };
        config.error_retry_max = 2;
        config.error_buffer_size = 16;
        let c = backup_coordinator_init(&config, null_mut(), null_mut());
        assert!(!c.is_null());
        // SAFETY: a zeroed context is valid; initialized right after.
        let ctx = Box::into_raw(Box::new(unsafe { std::mem::zeroed::<SRetryContext>() }));
        assert_eq!(backup_retry_context_init(ctx, 1, 0), BACKUP_SUCCESS);
        Fx {
            file: path("file.dat"),
            bad_file: path("no-such-dir/"),
            fenced_file: path("fenced.dat"),
            state_dir: dir.path().join("state").to_str().unwrap().to_string(),
            _dir: dir,
            c,
            ctx,
            records: zeroed_boxed::<[SLogBackupRetryRecord; 4]>().cast(),
            history: zeroed_boxed::<[SBackupErrorRecord; 4]>().cast(),
            count: Box::into_raw(Box::new(0u32)),
            text: Box::into_raw(Box::new([0 as c_char; 1 << 16])).cast(),
        }
    }
}

/// A leaked all-zero value of a C record type (integers and arrays of them).
fn zeroed_boxed<T>() -> *mut T {
    // SAFETY: used only for the C record types above, for which all-zero is a valid value.
    Box::into_raw(Box::new(unsafe { std::mem::zeroed::<T>() }))
}

unsafe extern "C" fn ok_op(_: *mut c_void) -> i32 {
    BACKUP_SUCCESS
}
unsafe extern "C" fn network_op(_: *mut c_void) -> i32 {
    BACKUP_ERROR_NETWORK
}
unsafe extern "C" fn disk_full_op(_: *mut c_void) -> i32 {
    BACKUP_ERROR_DISK_FULL
}
unsafe extern "C" fn ok_fenced_op(_: *mut c_void, token: u64) -> i32 {
    assert_ne!(token, 0, "a claim's token is never 0");
    BACKUP_SUCCESS
}
unsafe extern "C" fn disk_full_fenced_op(_: *mut c_void, _: u64) -> i32 {
    BACKUP_ERROR_DISK_FULL
}
unsafe extern "C" fn not_exist(
    _: *mut c_void,
    state: *mut ELogBackupKernelState,
    _: *mut bool,
) -> i32 {
    // SAFETY: the library passes a writable state.
    unsafe { *state = 1 };
    BACKUP_SUCCESS
}
unsafe extern "C" fn query_denied(
    _: *mut c_void,
    _: *mut ELogBackupKernelState,
    _: *mut bool,
) -> i32 {
    BACKUP_ERROR_PERMISSION_DENIED
}
unsafe extern "C" fn exec_ok(_: *mut c_void, _: ELogSubCommand) -> i32 {
    BACKUP_SUCCESS
}

const DATA: &[u8] = b"x";

/// A fencing token above every one used before (starting above the `failing` call's 1).
fn next_token() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(2);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
const TASK: &CStr = c"task-1";
const KEY: &CStr = c"key-1";

fn policy(multiplier: f64) -> SRetryPolicy {
    SRetryPolicy {
        max_retry: 1,
        initial_interval_ms: 0,
        max_interval_ms: 0,
        multiplier,
        jitter: CBool::FALSE,
        timeout_ms: 0,
    }
}

type Call = fn(&Fx) -> Ret;

struct Row {
    name: &'static str,
    kind: Kind,
    /// A call with valid arguments (it may still fail for another reason).
    valid: Call,
    /// A call with valid arguments that fails (an operation's failure, a value out of range).
    failing: Option<Call>,
    /// For each pointer argument that may not be NULL: its name, and a call with it NULL.
    nulls: &'static [(&'static str, Call)],
}

fn table() -> Vec<Row> {
    use Kind::*;
    use Ret::*;
    vec![
        // §1-§2: retry contexts.
        Row {
            name: "backup_error_string",
            kind: Pure,
            valid: |_| text(backup_error_string(BACKUP_ERROR_FILE_IO)),
            failing: None,
            nulls: &[],
        },
        Row {
            name: "backup_retry_context_init",
            kind: Pure,
            valid: |f| Code(backup_retry_context_init(f.ctx, 1, 0)),
            failing: None,
            nulls: &[("retry_context", |_| {
                Code(backup_retry_context_init(null_mut(), 1, 0))
            })],
        },
        Row {
            name: "backup_retry_context_destroy",
            kind: Pure,
            valid: |f| {
                backup_retry_context_destroy(f.ctx);
                Void
            },
            failing: None,
            nulls: &[("retry_context", |_| {
                backup_retry_context_destroy(null_mut());
                Void
            })],
        },
        Row {
            name: "backup_execute_with_retry",
            kind: Pure,
            valid: |f| Code(backup_execute_with_retry(f.ctx, Some(ok_op), null_mut())),
            failing: Some(|f| {
                Code(backup_execute_with_retry(
                    f.ctx,
                    Some(network_op),
                    null_mut(),
                ))
            }),
            nulls: &[
                ("retry_context", |_| {
                    Code(backup_execute_with_retry(
                        null_mut(),
                        Some(ok_op),
                        null_mut(),
                    ))
                }),
                ("op", |f| {
                    Code(backup_execute_with_retry(f.ctx, None, null_mut()))
                }),
            ],
        },
        Row {
            name: "backup_execute_with_retry_policy",
            kind: Pure,
            valid: |f| {
                Code(backup_execute_with_retry_policy(
                    f.ctx,
                    &policy(1.0),
                    Some(ok_op),
                    null_mut(),
                ))
            },
            failing: Some(|f| {
                Code(backup_execute_with_retry_policy(
                    f.ctx,
                    &policy(0.5),
                    Some(ok_op),
                    null_mut(),
                ))
            }),
            nulls: &[
                ("retry_context", |_| {
                    Code(backup_execute_with_retry_policy(
                        null_mut(),
                        &policy(1.0),
                        Some(ok_op),
                        null_mut(),
                    ))
                }),
                ("policy", |f| {
                    Code(backup_execute_with_retry_policy(
                        f.ctx,
                        null(),
                        Some(ok_op),
                        null_mut(),
                    ))
                }),
                ("op", |f| {
                    Code(backup_execute_with_retry_policy(
                        f.ctx,
                        &policy(1.0),
                        None,
                        null_mut(),
                    ))
                }),
            ],
        },
        Row {
            name: "backup_should_retry",
            kind: Pure,
            valid: |f| Bool(backup_should_retry(f.ctx, BACKUP_ERROR_NETWORK)),
            failing: None,
            nulls: &[("retry_context", |_| {
                Bool(backup_should_retry(null_mut(), BACKUP_ERROR_NETWORK))
            })],
        },
        Row {
            name: "backup_wait_for_retry",
            kind: Pure,
            valid: |f| {
                backup_wait_for_retry(f.ctx);
                Void
            },
            failing: None,
            nulls: &[("retry_context", |_| {
                backup_wait_for_retry(null_mut());
                Void
            })],
        },
        // §3: coordinators.
        Row {
            name: "backup_coordinator_init",
            kind: Pure,
            valid: |_| {
                // SAFETY: all-zero is a valid config.
                let config: SBackupCoordinatorConfig = unsafe { std::mem::zeroed() };
                let c = backup_coordinator_init(&config, null_mut(), null_mut());
                backup_coordinator_destroy(c);
                Ptr(!c.is_null())
            },
            failing: None,
            nulls: &[("config", |_| {
                Ptr(!backup_coordinator_init(null(), null_mut(), null_mut()).is_null())
            })],
        },
        Row {
            name: "backup_coordinator_destroy",
            kind: Pure,
            valid: |_| {
                // SAFETY: all-zero is a valid config.
                let config: SBackupCoordinatorConfig = unsafe { std::mem::zeroed() };
                backup_coordinator_destroy(backup_coordinator_init(
                    &config,
                    null_mut(),
                    null_mut(),
                ));
                Void
            },
            failing: None,
            nulls: &[("coordinator", |_| {
                backup_coordinator_destroy(null_mut());
                Void
            })],
        },
        Row {
            name: "backup_record_error",
            kind: Record,
            valid: |f| {
                backup_record_error(f.c, BACKUP_ERROR_NETWORK, c"recorded".as_ptr());
                Void
            },
            failing: None,
            nulls: &[("coordinator", |_| {
                backup_record_error(null_mut(), BACKUP_ERROR_NETWORK, null());
                Void
            })],
        },
        Row {
            name: "backup_get_last_error",
            kind: CoordinatorRead,
            valid: |f| text(backup_get_last_error(f.c)),
            failing: None,
            nulls: &[("coordinator", |_| text(backup_get_last_error(null_mut())))],
        },
        Row {
            name: "backup_clear_error",
            kind: CoordinatorOp,
            valid: |f| {
                backup_clear_error(f.c);
                Void
            },
            failing: None,
            nulls: &[("coordinator", |_| {
                backup_clear_error(null_mut());
                Void
            })],
        },
        Row {
            name: "backup_get_error_stats",
            kind: CoordinatorRead,
            valid: |f| {
                let (mut e, mut r) = (0, 0);
                backup_get_error_stats(f.c, &mut e, &mut r);
                Void
            },
            failing: None,
            // NULL outputs are allowed; a NULL coordinator reads zeros.
            nulls: &[],
        },
        Row {
            name: "backup_write_file_with_retry",
            kind: CoordinatorOp,
            valid: |f| {
                Code(backup_write_file_with_retry(
                    f.c,
                    f.file.as_ptr(),
                    DATA.as_ptr().cast(),
                    DATA.len(),
                ))
            },
            failing: Some(|f| {
                Code(backup_write_file_with_retry(
                    f.c,
                    f.bad_file.as_ptr(),
                    DATA.as_ptr().cast(),
                    DATA.len(),
                ))
            }),
            nulls: &[
                ("coordinator", |f| {
                    Code(backup_write_file_with_retry(
                        null_mut(),
                        f.file.as_ptr(),
                        DATA.as_ptr().cast(),
                        1,
                    ))
                }),
                ("file_path", |f| {
                    Code(backup_write_file_with_retry(
                        f.c,
                        null(),
                        DATA.as_ptr().cast(),
                        1,
                    ))
                }),
                ("data", |f| {
                    Code(backup_write_file_with_retry(
                        f.c,
                        f.file.as_ptr(),
                        null(),
                        3,
                    ))
                }),
            ],
        },
        Row {
            name: "backup_get_error_history",
            kind: CoordinatorRead,
            valid: |f| Code(backup_get_error_history(f.c, f.history, 4, f.count)),
            failing: None,
            nulls: &[
                ("coordinator", |f| {
                    Code(backup_get_error_history(null_mut(), f.history, 4, f.count))
                }),
                ("count_out", |f| {
                    Code(backup_get_error_history(f.c, f.history, 4, null_mut()))
                }),
                ("out", |f| {
                    Code(backup_get_error_history(f.c, null_mut(), 4, f.count))
                }),
            ],
        },
        // §4: the plugin.
        Row {
            name: "backup_plugin_name",
            kind: Pure,
            valid: |_| text(backup_plugin_name()),
            failing: None,
            nulls: &[],
        },
        Row {
            name: "backup_plugin_version",
            kind: Pure,
            valid: |_| text(backup_plugin_version()),
            failing: None,
            nulls: &[],
        },
        Row {
            name: "backup_plugin_init",
            kind: Lifecycle,
            valid: |f| {
                let config = format!(
                    "state_dir = {:?}\nerror_retry_max = 2\nerror_retry_interval = 0\n",
                    f.state_dir
                );
                Code(backup_plugin_init(
                    config.as_ptr().cast(),
                    config.len() as u32,
                ))
            },
            failing: None,
            nulls: &[("config", |_| Code(backup_plugin_init(null(), 5)))],
        },
        Row {
            name: "backup_plugin_cleanup",
            kind: Lifecycle,
            valid: |_| {
                backup_plugin_cleanup();
                Void
            },
            failing: None,
            nulls: &[],
        },
        Row {
            name: "backup_plugin_get_last_error",
            kind: Accessor,
            valid: |_| text(backup_plugin_get_last_error()),
            failing: None,
            nulls: &[],
        },
        Row {
            name: "backup_plugin_get_error_stats",
            kind: Accessor,
            valid: |_| {
                let (mut e, mut r) = (0, 0);
                backup_plugin_get_error_stats(&mut e, &mut r);
                Void
            },
            failing: None,
            // NULL outputs are allowed.
            nulls: &[],
        },
        Row {
            name: "backup_plugin_clear_error",
            kind: Accessor,
            valid: |_| {
                backup_plugin_clear_error();
                Void
            },
            failing: None,
            nulls: &[],
        },
        Row {
            name: "backup_plugin_record_error",
            kind: Record,
            valid: |_| {
                backup_plugin_record_error(BACKUP_ERROR_NETWORK, null());
                Void
            },
            failing: None,
            nulls: &[],
        },
        Row {
            name: "backup_plugin_write_file_with_retry",
            kind: Booked,
            valid: |f| {
                Code(backup_plugin_write_file_with_retry(
                    f.file.as_ptr(),
                    DATA.as_ptr().cast(),
                    DATA.len(),
                ))
            },
            failing: Some(|f| {
                Code(backup_plugin_write_file_with_retry(
                    f.bad_file.as_ptr(),
                    DATA.as_ptr().cast(),
                    DATA.len(),
                ))
            }),
            nulls: &[
                ("path", |_| {
                    Code(backup_plugin_write_file_with_retry(
                        null(),
                        DATA.as_ptr().cast(),
                        1,
                    ))
                }),
                ("data", |f| {
                    Code(backup_plugin_write_file_with_retry(
                        f.file.as_ptr(),
                        null(),
                        3,
                    ))
                }),
            ],
        },
        Row {
            name: "backup_plugin_write_file_fenced",
            kind: Booked,
            // Each valid call raises the token, so no call of the rules is refused for one
            // made before it.
            valid: |f| {
                Code(backup_plugin_write_file_fenced(
                    f.fenced_file.as_ptr(),
                    DATA.as_ptr().cast(),
                    DATA.len(),
                    next_token(),
                ))
            },
            // A token below the one stored: refused, permanent, one error (the write that
            // raises the fence first succeeds and books nothing).
            failing: Some(|f| {
                let raised = backup_plugin_write_file_fenced(
                    f.fenced_file.as_ptr(),
                    DATA.as_ptr().cast(),
                    DATA.len(),
                    next_token(),
                );
                assert_eq!(raised, BACKUP_SUCCESS);
                Code(backup_plugin_write_file_fenced(
                    f.fenced_file.as_ptr(),
                    DATA.as_ptr().cast(),
                    DATA.len(),
                    1,
                ))
            }),
            nulls: &[
                ("file_path", |_| {
                    Code(backup_plugin_write_file_fenced(
                        null(),
                        DATA.as_ptr().cast(),
                        1,
                        next_token(),
                    ))
                }),
                ("data", |f| {
                    Code(backup_plugin_write_file_fenced(
                        f.fenced_file.as_ptr(),
                        null(),
                        3,
                        next_token(),
                    ))
                }),
                // Not a pointer, but rejected like one: before init, and naming itself.
                ("fencing_token", |f| {
                    Code(backup_plugin_write_file_fenced(
                        f.fenced_file.as_ptr(),
                        DATA.as_ptr().cast(),
                        DATA.len(),
                        0,
                    ))
                }),
            ],
        },
        Row {
            name: "backup_plugin_execute_with_retry",
            kind: Booked,
            valid: |_| Code(backup_plugin_execute_with_retry(Some(ok_op), null_mut())),
            // Retried twice, then exhausted: still one error.
            failing: Some(|_| {
                Code(backup_plugin_execute_with_retry(
                    Some(network_op),
                    null_mut(),
                ))
            }),
            nulls: &[("op", |_| {
                Code(backup_plugin_execute_with_retry(None, null_mut()))
            })],
        },
        Row {
            name: "backup_plugin_get_error_history",
            kind: Unbooked,
            valid: |f| Code(backup_plugin_get_error_history(f.history, 4, f.count)),
            failing: None,
            nulls: &[
                ("count_out", |f| {
                    Code(backup_plugin_get_error_history(f.history, 4, null_mut()))
                }),
                ("out", |f| {
                    Code(backup_plugin_get_error_history(null_mut(), 4, f.count))
                }),
            ],
        },
        Row {
            name: "backup_plugin_get_error_log_path",
            kind: Accessor,
            valid: |_| text(backup_plugin_get_error_log_path()),
            failing: None,
            nulls: &[],
        },
        Row {
            name: "backup_plugin_get_metrics",
            kind: Unbooked,
            valid: |f| {
                let mut len = 0;
                Code(backup_plugin_get_metrics(f.text, 1 << 16, &mut len))
            },
            failing: None,
            nulls: &[("len_out", |f| {
                Code(backup_plugin_get_metrics(f.text, 1 << 16, null_mut()))
            })],
        },
        // §7: log-backup commands.
        Row {
            name: "backup_log_check_idempotency",
            kind: Pure,
            valid: |_| {
                let mut out = SLogBackupDecision {
                    should_skip: false,
                    need_sync: false,
                    actual_command: 0,
                };
                Code(backup_log_check_idempotency(0, 1, false, &mut out))
            },
            failing: Some(|_| {
                let mut out = SLogBackupDecision {
                    should_skip: false,
                    need_sync: false,
                    actual_command: 0,
                };
                Code(backup_log_check_idempotency(99, 1, false, &mut out))
            }),
            nulls: &[("out", |_| {
                Code(backup_log_check_idempotency(0, 1, false, null_mut()))
            })],
        },
        Row {
            name: "backup_log_run_command",
            kind: Booked,
            valid: |_| {
                Code(backup_log_run_command(
                    TASK.as_ptr(),
                    0,
                    null(),
                    Some(not_exist),
                    Some(exec_ok),
                    null_mut(),
                ))
            },
            failing: Some(|_| {
                Code(backup_log_run_command(
                    TASK.as_ptr(),
                    0,
                    null(),
                    Some(query_denied),
                    Some(exec_ok),
                    null_mut(),
                ))
            }),
            nulls: &[
                ("task", |_| {
                    Code(backup_log_run_command(
                        null(),
                        0,
                        null(),
                        Some(not_exist),
                        Some(exec_ok),
                        null_mut(),
                    ))
                }),
                ("query", |_| {
                    Code(backup_log_run_command(
                        TASK.as_ptr(),
                        0,
                        null(),
                        None,
                        Some(exec_ok),
                        null_mut(),
                    ))
                }),
                ("execute", |_| {
                    Code(backup_log_run_command(
                        TASK.as_ptr(),
                        0,
                        null(),
                        Some(not_exist),
                        None,
                        null_mut(),
                    ))
                }),
            ],
        },
        Row {
            name: "backup_log_get_retry_records",
            kind: Unbooked,
            valid: |f| {
                Code(backup_log_get_retry_records(
                    TASK.as_ptr(),
                    0,
                    f.records,
                    4,
                    f.count,
                ))
            },
            failing: Some(|f| {
                Code(backup_log_get_retry_records(
                    TASK.as_ptr(),
                    99,
                    f.records,
                    4,
                    f.count,
                ))
            }),
            nulls: &[
                ("task", |f| {
                    Code(backup_log_get_retry_records(
                        null(),
                        0,
                        f.records,
                        4,
                        f.count,
                    ))
                }),
                ("count_out", |f| {
                    Code(backup_log_get_retry_records(
                        TASK.as_ptr(),
                        0,
                        f.records,
                        4,
                        null_mut(),
                    ))
                }),
                ("out", |f| {
                    Code(backup_log_get_retry_records(
                        TASK.as_ptr(),
                        0,
                        null_mut(),
                        4,
                        f.count,
                    ))
                }),
            ],
        },
        Row {
            name: "backup_log_reset_retry_records",
            kind: Unbooked,
            valid: |_| Code(backup_log_reset_retry_records(TASK.as_ptr(), 0)),
            failing: Some(|_| Code(backup_log_reset_retry_records(TASK.as_ptr(), 99))),
            nulls: &[("task", |_| Code(backup_log_reset_retry_records(null(), 0)))],
        },
        // §8: idempotency keys.
        Row {
            name: "backup_execute_idempotent",
            kind: Booked,
            valid: |_| {
                Code(backup_execute_idempotent(
                    KEY.as_ptr(),
                    null(),
                    0,
                    Some(ok_op),
                    null_mut(),
                    null_mut(),
                ))
            },
            failing: Some(|_| {
                Code(backup_execute_idempotent(
                    c"failing-key".as_ptr(),
                    null(),
                    0,
                    Some(disk_full_op),
                    null_mut(),
                    null_mut(),
                ))
            }),
            nulls: &[
                ("key", |_| {
                    Code(backup_execute_idempotent(
                        null(),
                        null(),
                        0,
                        Some(ok_op),
                        null_mut(),
                        null_mut(),
                    ))
                }),
                ("fingerprint", |_| {
                    Code(backup_execute_idempotent(
                        KEY.as_ptr(),
                        null(),
                        3,
                        Some(ok_op),
                        null_mut(),
                        null_mut(),
                    ))
                }),
                ("op", |_| {
                    Code(backup_execute_idempotent(
                        KEY.as_ptr(),
                        null(),
                        0,
                        None,
                        null_mut(),
                        null_mut(),
                    ))
                }),
            ],
        },
        Row {
            name: "backup_execute_idempotent_fenced",
            kind: Booked,
            valid: |_| {
                Code(backup_execute_idempotent_fenced(
                    c"fenced-key".as_ptr(),
                    null(),
                    0,
                    Some(ok_fenced_op),
                    null_mut(),
                    null_mut(),
                ))
            },
            failing: Some(|_| {
                Code(backup_execute_idempotent_fenced(
                    c"failing-fenced-key".as_ptr(),
                    null(),
                    0,
                    Some(disk_full_fenced_op),
                    null_mut(),
                    null_mut(),
                ))
            }),
            nulls: &[
                ("key", |_| {
                    Code(backup_execute_idempotent_fenced(
                        null(),
                        null(),
                        0,
                        Some(ok_fenced_op),
                        null_mut(),
                        null_mut(),
                    ))
                }),
                ("fingerprint", |_| {
                    Code(backup_execute_idempotent_fenced(
                        KEY.as_ptr(),
                        null(),
                        3,
                        Some(ok_fenced_op),
                        null_mut(),
                        null_mut(),
                    ))
                }),
                ("op", |_| {
                    Code(backup_execute_idempotent_fenced(
                        KEY.as_ptr(),
                        null(),
                        0,
                        None,
                        null_mut(),
                        null_mut(),
                    ))
                }),
            ],
        },
        Row {
            name: "backup_idempotency_check_claim",
            kind: Unbooked,
            // An answer (LEASE_LOST for a key never claimed), never booked.
            valid: |_| Code(backup_idempotency_check_claim(c"never-claimed".as_ptr(), 1)),
            failing: Some(|_| Code(backup_idempotency_check_claim(KEY.as_ptr(), 0))),
            nulls: &[("key", |_| Code(backup_idempotency_check_claim(null(), 1)))],
        },
        Row {
            name: "backup_idempotency_forget",
            kind: Unbooked,
            valid: |_| Code(backup_idempotency_forget(KEY.as_ptr())),
            failing: Some(|_| {
                let long = CString::new(vec![b'k'; 256]).unwrap();
                Code(backup_idempotency_forget(long.as_ptr()))
            }),
            nulls: &[("key", |_| Code(backup_idempotency_forget(null())))],
        },
    ]
}

/// The functions `include/backup_coordinator.h` declares.
fn header_exports() -> BTreeSet<String> {
    let header = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/include/backup_coordinator.h"
    ))
    .unwrap();
    let body = header
        .split("extern \"C\" {")
        .nth(1)
        .expect("the header has an extern \"C\" block");
    // A declaration: `<type> <name>(<parameters>);` on one line (cbindgen writes them so).
    body.lines()
        .map(str::trim)
        .filter(|line| line.ends_with(");") && !line.starts_with("typedef"))
        .filter_map(|line| {
            let before = &line[..line.find('(')?];
            let declarator =
                |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ' ' || c == '*';
            if !before.chars().all(declarator) {
                return None;
            }
            let name = before.rsplit([' ', '*']).next()?;
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

fn plugin_stats() -> (u64, u64) {
    let (mut e, mut r) = (0, 0);
    backup_plugin_get_error_stats(&mut e, &mut r);
    (e, r)
}

fn plugin_last_error() -> String {
    // SAFETY: never NULL, NUL-terminated.
    unsafe { CStr::from_ptr(backup_plugin_get_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn coordinator_errors(f: &Fx) -> u64 {
    let mut e = 0;
    backup_get_error_stats(f.c, &mut e, null_mut());
    e
}

fn coordinator_last_error(f: &Fx) -> String {
    // SAFETY: never NULL for a non-NULL coordinator, NUL-terminated.
    unsafe { CStr::from_ptr(backup_get_last_error(f.c)) }
        .to_string_lossy()
        .into_owned()
}

/// What a call rejected for a bad argument returns.
fn is_rejection(ret: &Ret, arg: &str) -> bool {
    match ret {
        Ret::Code(code) => *code == BACKUP_ERROR_INVALID_PARAM,
        Ret::Void => true,
        Ret::Bool(value) => !value,
        Ret::Ptr(non_null) => !non_null,
        Ret::Str(text) => text
            .as_deref()
            .is_some_and(|t| t.contains(&format!("`{arg}`"))),
    }
}

fn rule_the_table_lists_every_export_of_the_header(rows: &[Row]) {
    let listed: BTreeSet<String> = rows.iter().map(|r| r.name.to_string()).collect();
    assert_eq!(listed.len(), rows.len(), "a row is listed twice");
    let declared = header_exports();
    assert!(declared.len() >= 30, "header parse found only {declared:?}");
    let missing: Vec<_> = declared.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&declared).collect();
    assert!(
        missing.is_empty(),
        "exports missing from the table: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "rows naming no export of the header: {extra:?}"
    );
}

/// (b) Before init: the calls that need init return NOT_INITIALIZED, after their
/// parameter checks; the others work.
fn rule_before_init(rows: &[Row], f: &Fx) {
    for row in rows.iter().filter(|r| r.kind != Kind::Lifecycle) {
        let ret = (row.valid)(f);
        let needs_init = matches!(row.kind, Kind::Booked | Kind::Unbooked);
        if needs_init {
            assert_eq!(ret, Ret::Code(BACKUP_ERROR_NOT_INITIALIZED), "{}", row.name);
        } else {
            assert_ne!(ret, Ret::Code(BACKUP_ERROR_NOT_INITIALIZED), "{}", row.name);
        }
        for (arg, call) in row.nulls {
            let ret = call(f);
            assert!(
                is_rejection(&ret, arg),
                "{}: NULL `{arg}` before init gave {ret:?}, not a rejection (parameter checks come first)",
                row.name
            );
        }
        assert_eq!(
            plugin_last_error(),
            "Plugin not initialized",
            "{}",
            row.name
        );
        assert_eq!(plugin_stats(), (0, 0), "{}", row.name);
    }
}

/// (a) NULL arguments: INVALID_PARAM (a no-op for a void export), and the last error of
/// the plugin or the coordinator names the argument; calls that touch no such state leave
/// the plugin's alone.
fn rule_null_arguments(rows: &[Row], f: &Fx) {
    for row in rows {
        for (arg, call) in row.nulls {
            backup_plugin_clear_error();
            backup_clear_error(f.c);
            let ret = call(f);
            assert!(
                is_rejection(&ret, arg),
                "{}: NULL `{arg}` gave {ret:?}",
                row.name
            );
            let named = format!("`{arg}`");
            match row.kind {
                Kind::Booked | Kind::Unbooked => {
                    let last = plugin_last_error();
                    assert!(last.contains(&named), "{}: last error {last:?}", row.name);
                }
                Kind::CoordinatorOp | Kind::CoordinatorRead | Kind::Record
                    if *arg != "coordinator" =>
                {
                    let last = coordinator_last_error(f);
                    assert!(last.contains(&named), "{}: last error {last:?}", row.name);
                }
                Kind::Lifecycle => {
                    // A failed init keeps its reason; the instance (running) keeps its own.
                    assert_eq!(plugin_last_error(), "Success", "{}", row.name);
                }
                _ => assert_eq!(plugin_last_error(), "Success", "{}", row.name),
            }
        }
    }
}

/// (c) Booking: each failing plugin-level operation is one error in `error_count` (one per
/// call, not per attempt); no other call changes it; coordinator operations book into
/// the coordinator only.
fn rule_booking(rows: &[Row], f: &Fx) {
    for row in rows.iter().filter(|r| r.kind != Kind::Lifecycle) {
        let failing = row.failing.iter().map(|call| ("a failing call", *call));
        let nulls = row.nulls.iter().map(|(arg, call)| (*arg, *call));
        for (what, call) in failing.chain(nulls) {
            let (errors, _) = plugin_stats();
            let coordinator_before = coordinator_errors(f);
            let ret = call(f);
            assert_ne!(
                ret,
                Ret::Code(BACKUP_SUCCESS),
                "{} ({what}) did not fail",
                row.name
            );
            let booked = plugin_stats().0 - errors;
            let coordinator_booked = coordinator_errors(f) - coordinator_before;
            let (want, want_coordinator) = match row.kind {
                Kind::Booked => (1, 0),
                Kind::CoordinatorOp | Kind::Record if what != "coordinator" => (0, 1),
                _ => (0, 0),
            };
            assert_eq!(booked, want, "{} ({what}): plugin errors booked", row.name);
            assert_eq!(
                coordinator_booked, want_coordinator,
                "{} ({what}): coordinator errors booked",
                row.name
            );
        }
        // A call that succeeds books nothing (recording calls record, by their purpose).
        let (errors, _) = plugin_stats();
        (row.valid)(f);
        let want = u64::from(row.name == "backup_plugin_record_error");
        assert_eq!(plugin_stats().0 - errors, want, "{}: valid call", row.name);
    }
    // Retried attempts are not errors: two retries, one error.
    let (errors, retries) = plugin_stats();
    assert_eq!(
        backup_plugin_execute_with_retry(Some(network_op), null_mut()),
        BACKUP_ERROR_RETRY_EXHAUSTED
    );
    assert_eq!(plugin_stats(), (errors + 1, retries + 2));
}

/// (d) A panic inside any export is caught by its frame: it never unwinds into C, the call
/// fails (BACKUP_ERROR_UNKNOWN, a no-op for a void export), and a plugin-level operation
/// books it like any failure.
fn rule_panics_stay_inside(rows: &[Row], f: &Fx) {
    for row in rows {
        let (errors, _) = plugin_stats();
        fault::panic_in_next_call();
        let ret = (row.valid)(f);
        assert!(!fault::pending(), "{} does not run in the frame", row.name);
        match &ret {
            Ret::Code(code) => assert_eq!(*code, BACKUP_ERROR_UNKNOWN, "{}", row.name),
            Ret::Str(text) => assert!(
                text.as_deref().map_or(true, |t| t.contains("panic")),
                "{}: {text:?}",
                row.name
            ),
            Ret::Ptr(non_null) => assert!(!non_null, "{}", row.name),
            Ret::Bool(value) => assert!(!value, "{}", row.name),
            Ret::Void => {}
        }
        if row.kind == Kind::Booked {
            assert_eq!(plugin_stats().0, errors + 1, "{}", row.name);
            assert!(plugin_last_error().contains("panic"), "{}", row.name);
        }
    }
    // The panicking init and cleanup did nothing: the instance still runs.
    assert_ne!(plugin_last_error(), "Plugin not initialized");
}

#[test]
#[ignore = "run by `every_export_follows_abi_4` in a process of its own"]
fn export_table_in_a_fresh_process() {
    assert!(
        std::env::var_os(CHILD).is_some(),
        "run by every_export_follows_abi_4 (it needs a fresh plugin)"
    );
    let rows = table();
    let f = Fx::new();
    rule_the_table_lists_every_export_of_the_header(&rows);
    rule_before_init(&rows, &f);
    // A failed init's reason names the argument, and stays until the next init.
    assert_eq!(backup_plugin_init(null(), 5), BACKUP_ERROR_INVALID_PARAM);
    assert!(
        plugin_last_error().contains("`config`"),
        "{}",
        plugin_last_error()
    );
    let init = rows
        .iter()
        .find(|r| r.name == "backup_plugin_init")
        .unwrap();
    assert_eq!((init.valid)(&f), Ret::Code(BACKUP_SUCCESS));
    rule_null_arguments(&rows, &f);
    rule_booking(&rows, &f);
    rule_panics_stay_inside(&rows, &f);
    backup_plugin_cleanup();
    backup_coordinator_destroy(f.c);
}

#[test]
fn every_export_follows_abi_4() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "ffi::export_table::export_table_in_a_fresh_process",
            "--exact",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the export table failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
