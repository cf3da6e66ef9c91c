//! Every exported C function driven with arbitrary arguments: keys, task names, paths
//! (all inside a scratch directory that is the process's working directory), command and
//! state values, codes, buffer sizes, NULL-or-not pointers, configs, and C structs whose
//! `bool` bytes hold any value (as C code can leave them).
//!
//! Must hold: no panic (a panic that the guard catches is reported as a finding too:
//! the frame of every export turns it into BACKUP_ERROR_UNKNOWN, which no call below may return), no
//! memory error (the fuzzer builds with AddressSanitizer), and every returned string is a
//! NUL-terminated C string.
#![no_main]

use arbitrary::Arbitrary;
use backup_coordinator::ffi::coordinator::*;
use backup_coordinator::ffi::idempotency::*;
use backup_coordinator::ffi::log_backup::*;
use backup_coordinator::ffi::plugin::*;
use backup_coordinator::ffi::retry::*;
use backup_coordinator::ffi::types::*;
use libfuzzer_sys::fuzz_target;
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::{size_of, MaybeUninit};
use std::ptr::{addr_of_mut, null, null_mut};
use std::sync::OnceLock;

const UNKNOWN: i32 = BACKUP_ERROR_UNKNOWN;

/// A C string argument: NULL, or the bytes up to the first NUL.
#[derive(Arbitrary, Debug)]
struct CArg(Option<Vec<u8>>);

impl CArg {
    fn owned(&self) -> Option<CString> {
        self.0.as_ref().map(|b| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            CString::new(&b[..end]).unwrap()
        })
    }
}

fn ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(null(), |s| s.as_ptr())
}

/// A path inside the working directory: its components, minus any that could leave it.
#[derive(Arbitrary, Debug)]
struct FuzzPath {
    null: bool,
    components: Vec<Vec<u8>>,
}

impl FuzzPath {
    fn owned(&self) -> Option<CString> {
        if self.null {
            return None;
        }
        let mut path = Vec::new();
        for c in self.components.iter().take(4) {
            let c: Vec<u8> = c
                .iter()
                .copied()
                .filter(|&b| b != 0 && b != b'/')
                .take(40)
                .collect();
            if c.is_empty() || c == b"." || c == b".." {
                continue;
            }
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&c);
        }
        Some(CString::new(path).unwrap())
    }
}

/// Scripted results of a host operation: the codes it returns in turn, then 0.
struct Script {
    codes: Vec<i32>,
    next: usize,
}

impl Script {
    fn new(codes: &[i32]) -> Self {
        // The host never returns UNKNOWN here, so that UNKNOWN from a call means a panic.
        let codes = codes
            .iter()
            .map(|&c| if c == UNKNOWN { -5 } else { c })
            .take(6)
            .collect();
        Script { codes, next: 0 }
    }
    fn step(&mut self) -> i32 {
        let code = self.codes.get(self.next).copied().unwrap_or(0);
        self.next += 1;
        code
    }
}

unsafe extern "C" fn scripted_op(user_data: *mut c_void) -> i32 {
    unsafe { (*(user_data as *mut Script)).step() }
}

/// A fenced call's host: its script, the key it runs under, and the token of its first
/// attempt (every attempt of one call gets the same, C_API §8.1).
struct FencedHost {
    script: Script,
    key: Vec<u8>,
    token: Option<u64>,
}

/// Checks what C_API §8.1 promises the operation: a token that is never 0, the same on
/// every attempt of the call, and its own claim held while it runs.
unsafe extern "C" fn fenced_op(user_data: *mut c_void, token: u64) -> i32 {
    let host = unsafe { &mut *(user_data as *mut FencedHost) };
    assert_ne!(token, 0, "a fencing token is never 0");
    assert_eq!(
        *host.token.get_or_insert(token),
        token,
        "one token per call"
    );
    let held = backup_idempotency_check_claim(host.key.as_ptr() as *const c_char, token);
    assert_eq!(held, 0, "the running claim's own token is held");
    host.script.step()
}

/// A host task for the log-backup calls: states and truncation bytes as the host reports.
struct HostTask {
    states: Vec<i32>,
    truncated_byte: u8,
    query_codes: Script,
    exec_codes: Script,
    calls: usize,
}

unsafe extern "C" fn task_query(ud: *mut c_void, state: *mut i32, truncated: *mut bool) -> i32 {
    let task = unsafe { &mut *(ud as *mut HostTask) };
    task.calls += 1;
    let code = task.query_codes.step();
    let s = task
        .states
        .get(task.calls % task.states.len().max(1))
        .copied()
        .unwrap_or(2);
    unsafe {
        *state = s;
        // C writes whatever byte it likes into a bool.
        truncated.cast::<u8>().write(task.truncated_byte);
    }
    code
}

unsafe extern "C" fn task_execute(ud: *mut c_void, _command: i32) -> i32 {
    unsafe { (*(ud as *mut HostTask)).exec_codes.step() }
}

#[derive(Arbitrary, Debug)]
struct InitConfig {
    null: bool,
    retry_max: u8,
    buffer_size: u32,
    logging: bool,
    state: bool,
    error_store: bool,
    log_path: bool,
    /// More TOML, kept only when it can name no path outside the working directory.
    extra: String,
    /// Passed as config_len - len (C hosts pass strlen + 1, or too little).
    len_delta: i8,
}

#[derive(Arbitrary, Debug)]
struct CoordinatorFields {
    library_made: bool,
    bool_bytes: [u8; 3],
    error_retry_max: u8,
    error_buffer_size: u32,
    error_store_path: FuzzPath,
    encryption_key: CArg,
    backup_path: CArg,
    error_count: u64,
    retry_count: u64,
}

#[derive(Arbitrary, Debug)]
enum CoordinatorOp {
    Record {
        code: i32,
        message: CArg,
    },
    LastError,
    Clear,
    Stats {
        null_errors: bool,
        null_retries: bool,
    },
    Write {
        path: FuzzPath,
        data: Vec<u8>,
        null_data: bool,
    },
    History {
        capacity: u8,
        null_out: bool,
        null_count: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum Op {
    Init(InitConfig),
    Cleanup,
    RecordError {
        code: i32,
        message: CArg,
    },
    LastError,
    ClearError,
    Stats {
        null_errors: bool,
        null_retries: bool,
    },
    History {
        capacity: u8,
        null_out: bool,
        null_count: bool,
    },
    WriteFile {
        path: FuzzPath,
        data: Vec<u8>,
        null_data: bool,
        size: u8,
    },
    Execute {
        codes: Vec<i32>,
        null_op: bool,
    },
    ErrorLogPath,
    Metrics {
        capacity: u16,
        null_buffer: bool,
        null_len: bool,
    },
    ErrorString {
        code: i32,
    },
    RetryContext {
        null_ctx: bool,
        max_retry: u8,
        codes: Vec<i32>,
        null_op: bool,
        check: i32,
    },
    RetryPolicy {
        null_policy: bool,
        max_retry: u8,
        initial_ms: u8,
        max_ms: u8,
        multiplier: f64,
        jitter_byte: u8,
        timeout_ms: u8,
        codes: Vec<i32>,
    },
    Decide {
        command: i32,
        state: i32,
        truncated: bool,
        null_out: bool,
    },
    LogRun {
        task: CArg,
        command: i32,
        policy: Option<(u8, u8, u8, u8)>,
        states: Vec<i32>,
        truncated_byte: u8,
        query_codes: Vec<i32>,
        exec_codes: Vec<i32>,
        null_query: bool,
        null_execute: bool,
    },
    LogRecords {
        task: CArg,
        command: i32,
        capacity: u8,
        null_out: bool,
        null_count: bool,
    },
    LogReset {
        task: CArg,
        command: i32,
    },
    Idempotent {
        key: CArg,
        fingerprint: Vec<u8>,
        null_fingerprint: bool,
        codes: Vec<i32>,
        null_op: bool,
        null_replayed: bool,
    },
    Forget {
        key: CArg,
    },
    IdempotentFenced {
        key: CArg,
        fingerprint: Vec<u8>,
        codes: Vec<i32>,
        null_op: bool,
        null_replayed: bool,
    },
    CheckClaim {
        key: CArg,
        token: u64,
    },
    WriteFenced {
        path: FuzzPath,
        data: Vec<u8>,
        null_data: bool,
        size: u8,
        token: u64,
    },
    Coordinator {
        fields: CoordinatorFields,
        ops: Vec<CoordinatorOp>,
    },
}

fn check_string(s: *const c_char) {
    if !s.is_null() {
        let _ = unsafe { CStr::from_ptr(s) }.to_bytes().len();
    }
}

fn ok(code: i32) {
    assert_ne!(
        code, UNKNOWN,
        "a call returned BACKUP_ERROR_UNKNOWN (a caught panic?)"
    );
}

/// The working directory: a scratch directory, emptied before each input.
fn workdir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::path::Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        std::env::set_current_dir(dir.path()).expect("enter the scratch dir");
        dir
    })
    .path()
}

fn empty(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            let _ = std::fs::remove_dir_all(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn init(c: &InitConfig) {
    let dir = workdir();
    let mut text = format!(
        "error_retry_max = {}\nerror_retry_interval = 0\nerror_buffer_size = {}\nenable_error_logging = {}\n",
        c.retry_max % 4,
        c.buffer_size,
        c.logging
    );
    for (wanted, key, name) in [
        (c.state, "state_dir", "state"),
        (c.error_store, "error_store_path", "errors"),
        (c.log_path, "log_path", "logs"),
    ] {
        if wanted {
            text += &format!("{key} = \"{}\"\n", dir.join(name).display());
        }
    }
    // The fixed part always goes in whole: with a retry interval of 0, no call waits in real
    // time. The extra text may name no path outside the working directory (no separator,
    // escape or parent), no etcd (no network), and no retry key (no real waits).
    let fixed = text.len();
    let unsafe_extra = c.extra.contains(['/', '\\'])
        || ["..", "etcd", "retry", "interval", "timeout"]
            .iter()
            .any(|w| c.extra.contains(w));
    if !unsafe_extra {
        text += &c.extra;
    }
    let bytes = text.into_bytes();
    let extra = (bytes.len() - fixed) as i64;
    let len = fixed as u32 + (extra + c.len_delta as i64).clamp(0, extra + 1) as u32;
    let mut buffer = bytes.clone();
    buffer.push(0);
    if c.null {
        // NULL with a length is refused; NULL with 0 means the defaults, whose 5 s retry
        // interval would make the next failing call wait: that instance is removed at once.
        let code = backup_plugin_init(null(), len % 2);
        ok(code);
        backup_plugin_cleanup();
    } else {
        ok(backup_plugin_init(buffer.as_ptr() as *const c_char, len));
    }
}

unsafe fn run_coordinator(f: &CoordinatorFields, ops: &[CoordinatorOp]) {
    let store = f.error_store_path.owned();
    let key = f.encryption_key.owned();
    let backup = f.backup_path.owned();
    unsafe {
        let mut config = MaybeUninit::<SBackupCoordinatorConfig>::zeroed();
        let cfg = config.as_mut_ptr();
        (*cfg).error_retry_max = (f.error_retry_max % 3) as u32;
        (*cfg).error_retry_interval = 0;
        (*cfg).error_buffer_size = f.error_buffer_size;
        (*cfg).error_store_path = ptr(&store) as *mut c_char;
        (*cfg).encryption_key = ptr(&key) as *mut c_char;
        (*cfg).backup_path = ptr(&backup) as *mut c_char;
        addr_of_mut!((*cfg).enable_compression)
            .cast::<u8>()
            .write(f.bool_bytes[0]);
        addr_of_mut!((*cfg).enable_encryption)
            .cast::<u8>()
            .write(f.bool_bytes[1]);
        addr_of_mut!((*cfg).enable_error_logging)
            .cast::<u8>()
            .write(f.bool_bytes[2]);
        let c: *mut SBackupCoordinator = if f.library_made {
            backup_coordinator_init(cfg, null_mut(), null_mut())
        } else {
            let c = libc::calloc(1, size_of::<SBackupCoordinator>()) as *mut SBackupCoordinator;
            std::ptr::copy_nonoverlapping(cfg, addr_of_mut!((*c).config), 1);
            (*c).error_count = f.error_count;
            (*c).retry_count = f.retry_count;
            backup_retry_context_init(addr_of_mut!((*c).retry_context), 0, 0);
            c
        };
        assert!(!c.is_null());
        for op in ops.iter().take(8) {
            match op {
                CoordinatorOp::Record { code, message } => {
                    let m = message.owned();
                    backup_record_error(c, *code, ptr(&m));
                }
                CoordinatorOp::LastError => check_string(backup_get_last_error(c)),
                CoordinatorOp::Clear => backup_clear_error(c),
                CoordinatorOp::Stats {
                    null_errors,
                    null_retries,
                } => {
                    let (mut e, mut r) = (0u64, 0u64);
                    backup_get_error_stats(
                        c,
                        if *null_errors { null_mut() } else { &mut e },
                        if *null_retries { null_mut() } else { &mut r },
                    );
                }
                CoordinatorOp::Write {
                    path,
                    data,
                    null_data,
                } => {
                    let p = path.owned();
                    let d = if *null_data {
                        null()
                    } else {
                        data.as_ptr() as *const c_void
                    };
                    ok(backup_write_file_with_retry(c, ptr(&p), d, data.len()));
                }
                CoordinatorOp::History {
                    capacity,
                    null_out,
                    null_count,
                } => {
                    let mut out: Vec<MaybeUninit<SBackupErrorRecord>> =
                        (0..*capacity).map(|_| MaybeUninit::uninit()).collect();
                    let mut count = 0u32;
                    ok(backup_get_error_history(
                        c,
                        if *null_out {
                            null_mut()
                        } else {
                            out.as_mut_ptr().cast()
                        },
                        *capacity as u32,
                        if *null_count { null_mut() } else { &mut count },
                    ));
                }
            }
        }
        backup_coordinator_destroy(c);
    }
}

fn run(op: &Op) {
    match op {
        Op::Init(config) => init(config),
        Op::Cleanup => backup_plugin_cleanup(),
        Op::RecordError { code, message } => {
            let m = message.owned();
            backup_plugin_record_error(*code, ptr(&m));
        }
        Op::LastError => check_string(backup_plugin_get_last_error()),
        Op::ClearError => backup_plugin_clear_error(),
        Op::Stats {
            null_errors,
            null_retries,
        } => {
            let (mut e, mut r) = (0u64, 0u64);
            backup_plugin_get_error_stats(
                if *null_errors { null_mut() } else { &mut e },
                if *null_retries { null_mut() } else { &mut r },
            );
        }
        Op::History {
            capacity,
            null_out,
            null_count,
        } => {
            let mut out: Vec<MaybeUninit<SBackupErrorRecord>> =
                (0..*capacity).map(|_| MaybeUninit::uninit()).collect();
            let mut count = 0u32;
            ok(backup_plugin_get_error_history(
                if *null_out {
                    null_mut()
                } else {
                    out.as_mut_ptr().cast()
                },
                *capacity as u32,
                if *null_count { null_mut() } else { &mut count },
            ));
        }
        Op::WriteFile {
            path,
            data,
            null_data,
            size,
        } => {
            let p = path.owned();
            let (d, n) = if *null_data {
                (null(), *size as usize % 2)
            } else {
                (data.as_ptr(), data.len())
            };
            ok(backup_plugin_write_file_with_retry(
                ptr(&p),
                d as *const c_void,
                n,
            ));
        }
        Op::Execute { codes, null_op } => {
            let mut script = Script::new(codes);
            let op = if *null_op {
                None
            } else {
                Some(scripted_op as _)
            };
            ok(backup_plugin_execute_with_retry(
                op,
                &mut script as *mut Script as *mut c_void,
            ));
        }
        Op::ErrorLogPath => check_string(backup_plugin_get_error_log_path()),
        Op::Metrics {
            capacity,
            null_buffer,
            null_len,
        } => {
            let mut buffer = vec![0 as c_char; *capacity as usize];
            let mut len = 0usize;
            let code = backup_plugin_get_metrics(
                if *null_buffer {
                    null_mut()
                } else {
                    buffer.as_mut_ptr()
                },
                *capacity as usize,
                if *null_len { null_mut() } else { &mut len },
            );
            ok(code);
            if code == BACKUP_SUCCESS {
                assert_eq!(buffer[len], 0);
            }
        }
        Op::ErrorString { code } => check_string(backup_error_string(*code)),
        Op::RetryContext {
            null_ctx,
            max_retry,
            codes,
            null_op,
            check,
        } => {
            let mut ctx = MaybeUninit::<SRetryContext>::uninit();
            let p = if *null_ctx {
                null_mut()
            } else {
                ctx.as_mut_ptr()
            };
            ok(backup_retry_context_init(p, (*max_retry % 4) as u32, 0));
            let mut script = Script::new(codes);
            let op = if *null_op {
                None
            } else {
                Some(scripted_op as _)
            };
            ok(backup_execute_with_retry(
                p,
                op,
                &mut script as *mut Script as *mut c_void,
            ));
            let _ = backup_should_retry(p, *check);
            if !*null_ctx {
                unsafe { check_string((*p).error_message) };
            }
            backup_retry_context_destroy(p);
        }
        Op::RetryPolicy {
            null_policy,
            max_retry,
            initial_ms,
            max_ms,
            multiplier,
            jitter_byte,
            timeout_ms,
            codes,
        } => {
            let mut ctx = MaybeUninit::<SRetryContext>::uninit();
            ok(backup_retry_context_init(ctx.as_mut_ptr(), 0, 0));
            // Filled field by field, the bool as whatever byte C left there.
            let mut policy = MaybeUninit::<SRetryPolicy>::zeroed();
            unsafe {
                let p = policy.as_mut_ptr();
                (*p).max_retry = (*max_retry % 5) as u32;
                (*p).initial_interval_ms = (*initial_ms % 3) as u64;
                (*p).max_interval_ms = (*max_ms % 4) as u64;
                (*p).multiplier = *multiplier;
                addr_of_mut!((*p).jitter).cast::<u8>().write(*jitter_byte);
                (*p).timeout_ms = (*timeout_ms % 16) as u64;
            }
            let mut script = Script::new(codes);
            ok(backup_execute_with_retry_policy(
                ctx.as_mut_ptr(),
                if *null_policy {
                    null()
                } else {
                    policy.as_ptr()
                },
                Some(scripted_op),
                &mut script as *mut Script as *mut c_void,
            ));
            backup_retry_context_destroy(ctx.as_mut_ptr());
        }
        Op::Decide {
            command,
            state,
            truncated,
            null_out,
        } => {
            let mut out = MaybeUninit::<SLogBackupDecision>::uninit();
            ok(backup_log_check_idempotency(
                *command,
                *state,
                *truncated,
                if *null_out {
                    null_mut()
                } else {
                    out.as_mut_ptr()
                },
            ));
        }
        Op::LogRun {
            task,
            command,
            policy,
            states,
            truncated_byte,
            query_codes,
            exec_codes,
            null_query,
            null_execute,
        } => {
            let t = task.owned();
            let policy = policy.map(|(max, min, cap, timeout)| SLogBackupRetryPolicy {
                max_retry_times: (max % 4) as u32,
                min_retry_duration_ms: 1 + (min % 2) as u64,
                max_retry_duration_ms: 1 + (cap % 2) as u64,
                retry_timeout_ms: 1 + (timeout % 8) as u64,
            });
            // The default policy (NULL) waits 30 s before a retry: with it, the host never fails.
            let (query_codes, exec_codes) = match policy {
                Some(_) => (Script::new(query_codes), Script::new(exec_codes)),
                None => (Script::new(&[]), Script::new(&[])),
            };
            let mut host = HostTask {
                states: states.iter().copied().take(6).collect(),
                truncated_byte: *truncated_byte,
                query_codes,
                exec_codes,
                calls: 0,
            };
            ok(backup_log_run_command(
                ptr(&t),
                *command,
                policy.as_ref().map_or(null(), |p| p as *const _),
                if *null_query { None } else { Some(task_query) },
                if *null_execute {
                    None
                } else {
                    Some(task_execute)
                },
                &mut host as *mut HostTask as *mut c_void,
            ));
        }
        Op::LogRecords {
            task,
            command,
            capacity,
            null_out,
            null_count,
        } => {
            let t = task.owned();
            let mut out: Vec<MaybeUninit<SLogBackupRetryRecord>> =
                (0..*capacity).map(|_| MaybeUninit::uninit()).collect();
            let mut count = 0u32;
            ok(backup_log_get_retry_records(
                ptr(&t),
                *command,
                if *null_out {
                    null_mut()
                } else {
                    out.as_mut_ptr().cast()
                },
                *capacity as u32,
                if *null_count { null_mut() } else { &mut count },
            ));
        }
        Op::LogReset { task, command } => {
            let t = task.owned();
            ok(backup_log_reset_retry_records(ptr(&t), *command));
        }
        Op::Idempotent {
            key,
            fingerprint,
            null_fingerprint,
            codes,
            null_op,
            null_replayed,
        } => {
            let k = key.owned();
            let mut script = Script::new(codes);
            let mut replayed = MaybeUninit::<bool>::uninit();
            let (fp, len) = if *null_fingerprint {
                (null(), fingerprint.len() % 2)
            } else {
                (fingerprint.as_ptr(), fingerprint.len())
            };
            ok(backup_execute_idempotent(
                ptr(&k),
                fp as *const c_void,
                len,
                if *null_op { None } else { Some(scripted_op) },
                &mut script as *mut Script as *mut c_void,
                if *null_replayed {
                    null_mut()
                } else {
                    replayed.as_mut_ptr()
                },
            ));
        }
        Op::Forget { key } => {
            let k = key.owned();
            ok(backup_idempotency_forget(ptr(&k)));
        }
        Op::IdempotentFenced {
            key,
            fingerprint,
            codes,
            null_op,
            null_replayed,
        } => {
            let k = key.owned();
            let mut host = FencedHost {
                script: Script::new(codes),
                key: k
                    .as_ref()
                    .map(|k| k.as_bytes_with_nul().to_vec())
                    .unwrap_or_default(),
                token: None,
            };
            let mut replayed = MaybeUninit::<bool>::uninit();
            ok(backup_execute_idempotent_fenced(
                ptr(&k),
                fingerprint.as_ptr() as *const c_void,
                fingerprint.len(),
                if *null_op { None } else { Some(fenced_op) },
                &mut host as *mut FencedHost as *mut c_void,
                if *null_replayed {
                    null_mut()
                } else {
                    replayed.as_mut_ptr()
                },
            ));
        }
        Op::CheckClaim { key, token } => {
            let k = key.owned();
            ok(backup_idempotency_check_claim(ptr(&k), *token));
        }
        Op::WriteFenced {
            path,
            data,
            null_data,
            size,
            token,
        } => {
            let p = path.owned();
            let (d, n) = if *null_data {
                (null(), *size as usize % 2)
            } else {
                (data.as_ptr(), data.len())
            };
            ok(backup_plugin_write_file_fenced(
                ptr(&p),
                d as *const c_void,
                n,
                *token,
            ));
        }
        Op::Coordinator { fields, ops } => unsafe { run_coordinator(fields, ops) },
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let dir = workdir();
    backup_plugin_cleanup();
    empty(dir);
    for op in ops.iter().take(16) {
        run(op);
    }
    backup_plugin_cleanup();
});
