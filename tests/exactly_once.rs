//! "Exactly once for real", proven through the C ABI by breaking things: an owner process
//! SIGSTOPped past its lease while another takes its key over (unfenced, its success
//! stands; fenced, its late write is refused by the destination and its call says
//! LEASE_LOST, docs/C_API.md §8.1); cleanup landing while 24
//! threads hold claims; a reset and a second run of a log-backup command while the first
//! waits (in this process and from another one); paths that name no file.
//!
//! The plugin is one instance per process, so the tests of this file take turns
//! (`serial`). Child processes are this test binary run again with `EO_ROLE` set.

#[path = "common/child.rs"]
mod child;

use backup_coordinator::error::ErrorCode;
use backup_coordinator::ffi::idempotency::{
    backup_execute_idempotent, backup_execute_idempotent_fenced, backup_idempotency_check_claim,
};
use backup_coordinator::ffi::log_backup::{
    backup_log_get_retry_records, backup_log_reset_retry_records, backup_log_run_command,
    SLogBackupRetryPolicy,
};
use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_error_stats, backup_plugin_get_last_error,
    backup_plugin_init, backup_plugin_write_file_fenced, backup_plugin_write_file_with_retry,
};
use child::Child;
use parking_lot::Mutex;
use std::ffi::{c_void, CStr, CString};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SUCCESS: i32 = 0;
const IN_PROGRESS: i32 = ErrorCode::InProgress as i32;
const CANCELLED: i32 = ErrorCode::Cancelled as i32;
const NOT_INITIALIZED: i32 = ErrorCode::NotInitialized as i32;
const INVALID_PARAM: i32 = ErrorCode::InvalidParam as i32;

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the plugin for one test; cleans it up however the test ends.
struct Turn(#[allow(dead_code)] parking_lot::MutexGuard<'static, ()>);

fn turn() -> Turn {
    Turn(SERIAL.lock())
}

impl Drop for Turn {
    fn drop(&mut self) {
        backup_plugin_cleanup();
    }
}

fn init(config: &str) {
    let rc = backup_plugin_init(config.as_ptr() as *const _, config.len() as u32);
    assert_eq!(rc, SUCCESS, "init: {}", last_error());
}

fn last_error() -> String {
    // SAFETY: the plugin returns a NUL-terminated string valid until our next call.
    unsafe { CStr::from_ptr(backup_plugin_get_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn stats() -> (u64, u64) {
    let (mut errors, mut retries) = (0, 0);
    backup_plugin_get_error_stats(&mut errors, &mut retries);
    (errors, retries)
}

/// Runs `key` with `payload`; `op` is the C operation, `data` its argument.
fn execute(
    key: &str,
    payload: &str,
    op: unsafe extern "C" fn(*mut c_void) -> i32,
    data: usize,
) -> (i32, bool) {
    let key = CString::new(key).unwrap();
    let mut replayed = false;
    let rc = backup_execute_idempotent(
        key.as_ptr(),
        payload.as_ptr() as *const c_void,
        payload.len(),
        Some(op),
        data as *mut c_void,
        &mut replayed,
    );
    (rc, replayed)
}

/// Returns the code in `data`, counting calls.
static OP_CALLS: AtomicU32 = AtomicU32::new(0);
unsafe extern "C" fn return_code(data: *mut c_void) -> i32 {
    OP_CALLS.fetch_add(1, Ordering::SeqCst);
    data as usize as i32
}

/// Prints RUNNING, then takes `data` milliseconds (the parent stops us meanwhile).
unsafe extern "C" fn slow_success(data: *mut c_void) -> i32 {
    println!("RUNNING");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_millis(data as u64));
    0
}

fn spawn_child(role: &str, dir: &Path) -> Child {
    Child::command("eo_child")
        .env("EO_ROLE", role)
        .env("EO_DIR", dir)
        .spawn()
}

fn state_config(dir: &Path, extra: &str) -> String {
    format!(
        "state_dir = \"{}\"\nidempotency_lease = \"1s\"\nerror_retry_max = 0\n{extra}",
        dir.join("state").display()
    )
}

/// The body of a child process; a no-op in the normal test run.
#[test]
fn eo_child() {
    let Ok(role) = std::env::var("EO_ROLE") else {
        return;
    };
    let dir = std::path::PathBuf::from(std::env::var("EO_DIR").unwrap());
    init(&state_config(&dir, ""));
    match role.as_str() {
        // Claims `stalled` and runs a 600 ms operation (SIGSTOPped meanwhile).
        "owner" => {
            let (rc, replayed) = execute("stalled", "payload-a", slow_success, 600);
            println!("RESULT {rc} {replayed} {}", last_error());
        }
        // Runs a log-backup command that keeps failing, with long waits.
        "runner" => {
            let task = CString::new("task-x").unwrap();
            let policy = long_waits();
            println!("RUNNING");
            std::io::stdout().flush().unwrap();
            let rc = backup_log_run_command(
                task.as_ptr(),
                0,
                &policy,
                Some(query_not_exist),
                Some(execute_fails),
                std::ptr::null_mut(),
            );
            println!("RESULT {rc}");
        }
        // Claims `block` (fenced), is stopped inside its operation past its lease, then
        // writes its block with its token: after checking its claim ("checks"), or not.
        "fenced-checks" | "fenced-blind" => {
            let checks = role == "fenced-checks";
            let rc = execute_fenced("block", &dir, if checks { 1 } else { 0 }, stalled_writer);
            println!("RESULT {rc} {}", last_error());
        }
        other => panic!("unknown role {other}"),
    }
    std::io::stdout().flush().unwrap();
}

#[test]
fn a_stalled_owner_never_poisons_its_key() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    init(&state_config(dir.path(), ""));

    // Story 1: A stalls past its lease; B takes over, fails and releases; A resumes.
    let mut a = stalled_owner(dir.path());
    let (rc, _) = execute(
        "stalled",
        "payload-b",
        return_code,
        ErrorCode::PermissionDenied as usize,
    );
    assert_eq!(
        rc,
        ErrorCode::PermissionDenied as i32,
        "B took over and failed: {}",
        last_error()
    );
    a.signal(libc::SIGCONT);
    let result = a.wait_for("RESULT");
    assert!(a.wait().success());
    assert!(
        result.starts_with("RESULT 0 false"),
        "A's success stands: {result}"
    );
    // A's completion carries A's fingerprint: the same payload replays, no conflict.
    let (rc, replayed) = execute("stalled", "payload-a", return_code, 0);
    assert_eq!((rc, replayed), (SUCCESS, true), "{}", last_error());
    let (rc, _) = execute("stalled", "payload-b", return_code, 0);
    assert_eq!(rc, ErrorCode::IdempotencyConflict as i32);

    // Story 2: B still runs when A resumes: A returns its success, B's claim stands,
    // and a third caller meanwhile is refused.
    // A fresh key for this story: the child always uses `stalled`, so forget it first.
    forget("stalled");
    let mut a = stalled_owner(dir.path());
    let calls_before = OP_CALLS.load(Ordering::SeqCst);
    let b = std::thread::spawn(|| execute("stalled", "payload-a", b_waits_for_a, 0));
    while !B_RUNNING.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    a.signal(libc::SIGCONT);
    let result = a.wait_for("RESULT");
    assert!(a.wait().success());
    assert!(
        result.starts_with("RESULT 0 false"),
        "not IN_PROGRESS: {result}"
    );
    let (rc, _) = execute("stalled", "payload-a", return_code, 0);
    assert_eq!(rc, IN_PROGRESS, "B's live claim is B's");
    B_MAY_FINISH.store(true, Ordering::SeqCst);
    assert_eq!(b.join().unwrap(), (SUCCESS, false));
    let (rc, replayed) = execute("stalled", "payload-a", return_code, 0);
    assert_eq!((rc, replayed), (SUCCESS, true));
    assert_eq!(
        OP_CALLS.load(Ordering::SeqCst),
        calls_before,
        "no replay ran the op"
    );
    backup_plugin_cleanup();
}

/// What a fenced operation of this file gets: where its block goes, and what it does.
struct Block {
    dest: CString,
    content: &'static str,
    /// Calls `backup_idempotency_check_claim` before writing, as the contract advises.
    checks: bool,
    /// A test's hooks: between getting the token and writing; after writing.
    before_write: fn(u64),
    after_write: fn(),
}

static FENCED_TOKENS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

unsafe extern "C" fn fenced_block(data: *mut c_void, token: u64) -> i32 {
    // SAFETY: `data` is the &Block that execute_fenced passed.
    let block = unsafe { &*(data as *const Block) };
    FENCED_TOKENS.lock().push(token);
    (block.before_write)(token);
    let key = CString::new("block").unwrap();
    let check = match block.checks {
        true => backup_idempotency_check_claim(key.as_ptr(), token),
        false => SUCCESS,
    };
    let wrote = backup_plugin_write_file_fenced(
        block.dest.as_ptr(),
        block.content.as_ptr() as *const c_void,
        block.content.len(),
        token,
    );
    println!("WROTE {wrote} CHECK {check}");
    std::io::stdout().flush().unwrap();
    (block.after_write)();
    // A failed check stops the operation whatever the write did (it was tried here only to
    // show that the destination refuses it too).
    if check != SUCCESS {
        check
    } else {
        wrote
    }
}

/// Runs the fenced `key` whose operation writes `content` to `<dir>/dest` with its token.
fn execute_fenced_block(
    dir: &Path,
    checks: bool,
    content: &'static str,
    before_write: fn(u64),
    after_write: fn(),
) -> i32 {
    let block = Block {
        dest: CString::new(dir.join("dest").to_str().unwrap()).unwrap(),
        content,
        checks,
        before_write,
        after_write,
    };
    let key = CString::new("block").unwrap();
    let mut replayed = false;
    backup_execute_idempotent_fenced(
        key.as_ptr(),
        b"payload".as_ptr() as *const c_void,
        7,
        Some(fenced_block),
        &block as *const Block as *mut c_void,
        &mut replayed,
    )
}

fn execute_fenced(_key: &str, dir: &Path, checks: u32, hook: fn(u64)) -> i32 {
    execute_fenced_block(dir, checks == 1, "from the stalled owner", hook, || {})
}

/// The child's hook: says its token, then takes 600 ms (the parent stops it meanwhile).
fn stalled_writer(token: u64) {
    println!("RUNNING {token}");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_millis(600));
}

static TAKER_MAY_WRITE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static TAKER_WROTE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static TAKER_MAY_FINISH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[test]
fn a_stalled_owners_late_write_is_refused_and_its_call_says_lease_lost() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    init(&state_config(dir.path(), ""));
    let dest = dir.path().join("dest");
    let taker_content = "from the taker";

    // 1. The owner checks its claim before writing, as the contract advises, while the
    // taker (which wrote with its higher token) still runs: the check says LEASE_LOST, the
    // write it tries anyway is refused, and its call returns the check's LEASE_LOST.
    let mut a = spawn_child("fenced-checks", dir.path());
    let a_token: u64 = a.wait_for("RUNNING")[8..].parse().unwrap();
    a.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1_500));
    TAKER_MAY_FINISH.store(false, Ordering::SeqCst);
    TAKER_WROTE.store(false, Ordering::SeqCst);
    let taker_dir = dir.path().to_path_buf();
    let taker = std::thread::spawn(move || {
        execute_fenced_block(
            &taker_dir,
            true,
            taker_content,
            |_| {},
            || {
                TAKER_WROTE.store(true, Ordering::SeqCst);
                while !TAKER_MAY_FINISH.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
        )
    });
    while !TAKER_WROTE.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let b_token = *FENCED_TOKENS.lock().last().unwrap();
    assert!(b_token > a_token, "tokens {a_token} then {b_token}");
    a.signal(libc::SIGCONT);
    let wrote = a.wait_for("WROTE");
    let result = a.wait_for("RESULT");
    assert!(a.wait().success());
    assert_eq!(
        wrote,
        format!(
            "WROTE {} CHECK {}",
            ErrorCode::Fenced as i32,
            ErrorCode::LeaseLost as i32
        )
    );
    assert!(
        result.starts_with(&format!("RESULT {}", ErrorCode::LeaseLost as i32)),
        "{result}"
    );
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), taker_content);
    TAKER_MAY_FINISH.store(true, Ordering::SeqCst);
    assert_eq!(taker.join().unwrap(), SUCCESS, "{}", last_error());
    // Completed by the taker: the stalled owner's token is another claim's now.
    let key = CString::new("block").unwrap();
    assert_eq!(
        backup_idempotency_check_claim(key.as_ptr(), a_token),
        ErrorCode::IdempotencyConflict as i32
    );
    assert_eq!(
        backup_idempotency_check_claim(key.as_ptr(), b_token),
        SUCCESS
    );

    // 2. The owner writes without checking, before the taker writes: its write is
    // accepted (no higher token has written yet), but its call says LEASE_LOST, and the
    // taker's write with the higher token replaces it.
    forget("block");
    let mut a = spawn_child("fenced-blind", dir.path());
    let a_token: u64 = a.wait_for("RUNNING")[8..].parse().unwrap();
    a.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1_500));
    TAKER_MAY_WRITE.store(false, Ordering::SeqCst);
    let taker_dir = dir.path().to_path_buf();
    let taker = std::thread::spawn(move || {
        execute_fenced_block(
            &taker_dir,
            false,
            taker_content,
            |_| {
                while !TAKER_MAY_WRITE.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
            || {},
        )
    });
    // The taker holds its claim (and its token) now.
    while FENCED_TOKENS.lock().last().is_none_or(|t| *t <= a_token) {
        std::thread::sleep(Duration::from_millis(5));
    }
    a.signal(libc::SIGCONT);
    assert_eq!(
        a.wait_for("WROTE"),
        format!("WROTE {SUCCESS} CHECK {SUCCESS}")
    );
    let result = a.wait_for("RESULT");
    assert!(a.wait().success());
    assert!(
        result.starts_with(&format!("RESULT {}", ErrorCode::LeaseLost as i32))
            && result.contains("must be fenced"),
        "the owner's success came after its claim stopped being held: {result}"
    );
    assert_eq!(
        std::fs::read_to_string(&dest).unwrap(),
        "from the stalled owner"
    );
    TAKER_MAY_WRITE.store(true, Ordering::SeqCst);
    assert_eq!(
        taker.join().unwrap(),
        SUCCESS,
        "the taker: {}",
        last_error()
    );
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), taker_content);
    backup_plugin_cleanup();
}

/// A child that claimed `stalled` and is stopped inside its operation, past its lease.
fn stalled_owner(dir: &Path) -> Child {
    let mut a = spawn_child("owner", dir);
    a.wait_for("RUNNING");
    a.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1_500));
    a
}

fn forget(key: &str) {
    let key = CString::new(key).unwrap();
    let rc = backup_coordinator::ffi::idempotency::backup_idempotency_forget(key.as_ptr());
    assert_eq!(rc, SUCCESS, "{}", last_error());
}

static B_RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static B_MAY_FINISH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
unsafe extern "C" fn b_waits_for_a(_: *mut c_void) -> i32 {
    B_RUNNING.store(true, Ordering::SeqCst);
    while !B_MAY_FINISH.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    0
}

unsafe extern "C" fn network_error(_: *mut c_void) -> i32 {
    ErrorCode::Network as i32
}

#[test]
fn cleanup_cancels_every_call_in_flight_wherever_it_is() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "state_dir = \"{}\"\nerror_retry_max = 2\nerror_retry_interval = 3\n",
        dir.path().join("state").display()
    );
    let (mut calls, mut cancelled) = (0, 0);
    for round in 0..12u64 {
        init(&config);
        let started = Instant::now();
        let threads: Vec<_> = (0..24u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let key = format!("round-{round}-thread-{t}");
                    let began = Instant::now();
                    let (rc, _) = execute(&key, "p", network_error, 0);
                    (rc, began.elapsed())
                })
            })
            .collect();
        // Cleanup lands at a different instant each round: during claims, fsyncs, waits.
        std::thread::sleep(Duration::from_micros(round * 700));
        backup_plugin_cleanup();
        for thread in threads {
            let (rc, took) = thread.join().unwrap();
            calls += 1;
            assert!(
                rc == CANCELLED || rc == NOT_INITIALIZED,
                "round {round}: a call in flight returned {rc} after {took:?}"
            );
            assert!(
                took < Duration::from_secs(2),
                "round {round}: ran its schedule ({took:?})"
            );
            cancelled += (rc == CANCELLED) as u32;
        }
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    assert!(
        cancelled > 0,
        "no call was in flight when cleanup came ({calls} calls)"
    );
    eprintln!("{cancelled} of {calls} calls were cancelled in flight");
}

fn long_waits() -> SLogBackupRetryPolicy {
    SLogBackupRetryPolicy {
        max_retry_times: 3,
        min_retry_duration_ms: 60_000,
        max_retry_duration_ms: 60_000,
        retry_timeout_ms: 3_600_000,
    }
}

static EXECUTES: AtomicU32 = AtomicU32::new(0);
unsafe extern "C" fn query_not_exist(_: *mut c_void, state: *mut i32, truncated: *mut bool) -> i32 {
    // SAFETY: the plugin passes valid out-pointers.
    unsafe {
        *state = 1; // NOT_EXIST
        *truncated = false;
    }
    0
}
unsafe extern "C" fn execute_fails(_: *mut c_void, _command: i32) -> i32 {
    EXECUTES.fetch_add(1, Ordering::SeqCst);
    ErrorCode::Network as i32
}

fn records(task: &CString) -> u32 {
    let mut count = 0;
    let rc = backup_log_get_retry_records(task.as_ptr(), 0, std::ptr::null_mut(), 0, &mut count);
    assert_eq!(rc, SUCCESS, "{}", last_error());
    count
}

#[test]
fn a_running_log_command_is_neither_reset_nor_run_twice() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    init(&state_config(dir.path(), ""));
    let task = CString::new("task-x").unwrap();

    // In this process: the first call waits 60 s after its first failure.
    let first = std::thread::spawn(|| {
        let task = CString::new("task-x").unwrap();
        let policy = long_waits();
        backup_log_run_command(
            task.as_ptr(),
            0,
            &policy,
            Some(query_not_exist),
            Some(execute_fails),
            std::ptr::null_mut(),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(&task) == 0 {
        assert!(
            Instant::now() < deadline,
            "the first call never scheduled a retry"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let began = Instant::now();
    let policy = long_waits();
    let rc = backup_log_run_command(
        task.as_ptr(),
        0,
        &policy,
        Some(query_not_exist),
        Some(execute_fails),
        std::ptr::null_mut(),
    );
    assert_eq!(rc, IN_PROGRESS, "{}", last_error());
    assert!(began.elapsed() < Duration::from_secs(1), "returned at once");
    assert_eq!(
        backup_log_reset_retry_records(task.as_ptr(), 0),
        IN_PROGRESS
    );
    assert!(last_error().contains("in progress"), "{}", last_error());
    assert_eq!(records(&task), 1, "nothing removed");
    assert_eq!(EXECUTES.load(Ordering::SeqCst), 1, "one execute so far");
    backup_plugin_cleanup();
    assert_eq!(first.join().unwrap(), CANCELLED);

    // Nobody runs it now: the unfinished sequence can be reset.
    init(&state_config(dir.path(), ""));
    assert_eq!(
        backup_log_reset_retry_records(task.as_ptr(), 0),
        SUCCESS,
        "{}",
        last_error()
    );
    assert_eq!(records(&task), 0);
    // From another process: its run holds (task, command) until it dies.
    let mut runner = spawn_child("runner", dir.path());
    runner.wait_for("RUNNING");
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(&task) < 1 {
        assert!(
            Instant::now() < deadline,
            "the child never scheduled its retry"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        backup_log_reset_retry_records(task.as_ptr(), 0),
        IN_PROGRESS
    );
    let rc = backup_log_run_command(
        task.as_ptr(),
        0,
        &policy,
        Some(query_not_exist),
        Some(execute_fails),
        std::ptr::null_mut(),
    );
    assert_eq!(rc, IN_PROGRESS);
    assert_eq!(records(&task), 1);
    runner.kill();
    // The dead runner's claim went with it: reset works now.
    assert_eq!(
        backup_log_reset_retry_records(task.as_ptr(), 0),
        SUCCESS,
        "{}",
        last_error()
    );
    assert_eq!(records(&task), 0);
    backup_plugin_cleanup();
}

#[test]
fn paths_that_name_no_file_are_refused_at_once() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let config = "error_retry_max = 5\nerror_retry_interval = 1\n";
    init(config);
    let d = dir.path().display();
    for bad in [
        format!("{d}/.."),
        format!("{d}/."),
        format!("{d}/"),
        String::new(),
    ] {
        let path = CString::new(bad.clone()).unwrap();
        let began = Instant::now();
        let rc =
            backup_plugin_write_file_with_retry(path.as_ptr(), b"x".as_ptr() as *const c_void, 1);
        assert_eq!(rc, INVALID_PARAM, "{bad:?}: {}", last_error());
        assert!(
            began.elapsed() < Duration::from_millis(500),
            "{bad:?} was retried"
        );
        let named = if bad.is_empty() {
            "`path` is empty"
        } else {
            "names no file"
        };
        assert!(last_error().contains(named), "{}", last_error());
    }
    assert_eq!(stats(), (4, 0), "four errors, no retries");
    backup_plugin_cleanup();
}

#[test]
fn calls_without_a_state_store_name_state_dir_the_same_way() {
    let _turn = turn();
    init("");
    let key = CString::new("k").unwrap();
    let task = CString::new("t").unwrap();
    type Call<'a> = (&'a str, Box<dyn Fn() -> i32 + 'a>);
    let calls: [Call; 4] = [
        (
            "forget",
            Box::new(|| {
                backup_coordinator::ffi::idempotency::backup_idempotency_forget(key.as_ptr())
            }),
        ),
        (
            "reset",
            Box::new(|| backup_log_reset_retry_records(task.as_ptr(), 0)),
        ),
        (
            "get records",
            Box::new(|| {
                let mut n = 0;
                backup_log_get_retry_records(task.as_ptr(), 0, std::ptr::null_mut(), 0, &mut n)
            }),
        ),
        (
            "execute_idempotent",
            Box::new(|| execute("k", "p", return_code, 0).0),
        ),
    ];
    for (name, call) in calls.iter() {
        backup_coordinator::ffi::plugin::backup_plugin_clear_error();
        assert_eq!(call(), INVALID_PARAM, "{name}");
        assert!(
            last_error().contains("state_dir"),
            "{name}: {}",
            last_error()
        );
    }
    // Only the plugin-level operation is counted.
    assert_eq!(stats().0, 1);
    backup_plugin_cleanup();
}
