//! The etcd state store through the C ABI (C_API §9), as taosX uses it: `backup_plugin_init`
//! with `state_backend = "etcd"`, then idempotency keys and log-backup commands on a real
//! 3-member cluster; init with the cluster down, a keyed call failing closed, and the same
//! call working once the cluster is back; the cluster's space quota exhausted (DISK_FULL,
//! fail closed) and work resuming after the operator's compaction, defragmentation and
//! `alarm disarm`.
//!
//! The plugin is one instance per process: the tests of this file take turns.

#[path = "common/etcd.rs"]
mod etcd_cluster;

use backup_coordinator::error::ErrorCode;
use backup_coordinator::ffi::idempotency::{backup_execute_idempotent, backup_idempotency_forget};
use backup_coordinator::ffi::log_backup::{
    backup_log_get_retry_records, backup_log_reset_retry_records, backup_log_run_command,
    SLogBackupRetryPolicy, SLogBackupRetryRecord,
};
use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_error_stats, backup_plugin_get_last_error,
    backup_plugin_get_metrics, backup_plugin_init,
};
use etcd_cluster::Cluster;
use std::ffi::{c_void, CStr, CString};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

const SUCCESS: i32 = 0;
const CONFLICT: i32 = ErrorCode::IdempotencyConflict as i32;
const NETWORK: i32 = ErrorCode::Network as i32;
const CONNECTION_LOST: i32 = ErrorCode::ConnectionLost as i32;
const RETRY_EXHAUSTED: i32 = ErrorCode::RetryExhausted as i32;
const DISK_FULL: i32 = ErrorCode::DiskFull as i32;
const START: i32 = 0; // LOG_SUBCOMMAND_START
const NOT_EXIST: i32 = 1; // LOG_BACKUP_KERNEL_NOT_EXIST
const RUNNING: i32 = 2; // LOG_BACKUP_KERNEL_RUNNING

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the plugin for one test and cleans it up however the test ends. Declared before
/// the cluster, it is dropped after it: the cluster's members are stopped first, by pid.
struct Turn(#[allow(dead_code)] MutexGuard<'static, ()>);

fn turn() -> Turn {
    Turn(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Drop for Turn {
    fn drop(&mut self) {
        backup_plugin_cleanup();
    }
}

/// A prefix no other run of this test shares.
fn unique_prefix(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("/taosx/plugin-test/{name}-{}-{nanos}/", std::process::id())
}

fn etcd_config(endpoints: &[String], prefix: &str) -> String {
    let list = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "state_backend = \"etcd\"\n\
         etcd_endpoints = [{list}]\n\
         etcd_prefix = \"{prefix}\"\n\
         etcd_timeout = \"2s\"\n\
         idempotency_lease = \"2s\"\n\
         error_retry_max = 2\n\
         error_retry_interval = \"20ms\"\n"
    )
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

unsafe extern "C" fn count_op(user_data: *mut c_void) -> i32 {
    // SAFETY: every caller passes a live AtomicU32.
    let runs = unsafe { &*(user_data as *const AtomicU32) };
    runs.fetch_add(1, Ordering::SeqCst);
    SUCCESS
}

/// Runs `key` with `payload` through `count_op`; returns the code and `replayed`.
fn execute(key: &str, payload: &str, runs: &AtomicU32) -> (i32, bool) {
    let key = CString::new(key).unwrap();
    let mut replayed = false;
    let rc = backup_execute_idempotent(
        key.as_ptr(),
        payload.as_ptr() as *const c_void,
        payload.len(),
        Some(count_op),
        runs as *const AtomicU32 as *mut c_void,
        &mut replayed,
    );
    (rc, replayed)
}

fn metrics() -> String {
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0usize;
    let rc = backup_plugin_get_metrics(buf.as_mut_ptr() as *mut _, buf.len(), &mut len);
    assert_eq!(rc, SUCCESS, "{}", last_error());
    buf.truncate(len);
    String::from_utf8(buf).unwrap()
}

// The log-backup task: its state query says NOT_EXIST until an execute succeeds (RUNNING
// after it); its execute fails with NETWORK as many times as FAILS_LEFT says.
static EXECUTES: AtomicU32 = AtomicU32::new(0);
static FAILS_LEFT: AtomicU32 = AtomicU32::new(0);
static STARTED: AtomicU32 = AtomicU32::new(0);
static QUERIES: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" fn query_state(_: *mut c_void, state: *mut i32, truncated: *mut bool) -> i32 {
    QUERIES.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the plugin passes writable outs.
    unsafe {
        *state = if STARTED.load(Ordering::SeqCst) > 0 {
            RUNNING
        } else {
            NOT_EXIST
        };
        *truncated = false;
    }
    SUCCESS
}

unsafe extern "C" fn execute_start(_: *mut c_void, _command: i32) -> i32 {
    EXECUTES.fetch_add(1, Ordering::SeqCst);
    if FAILS_LEFT
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return NETWORK;
    }
    STARTED.store(1, Ordering::SeqCst);
    SUCCESS
}

/// A task not started yet, whose execute has no failure scripted, and no execute counted.
fn fresh_task() {
    for counter in [&EXECUTES, &FAILS_LEFT, &STARTED, &QUERIES] {
        counter.store(0, Ordering::SeqCst);
    }
}

fn run_start(task: &CString, max_retry_times: u32) -> i32 {
    let policy = SLogBackupRetryPolicy {
        max_retry_times,
        min_retry_duration_ms: 50,
        max_retry_duration_ms: 200,
        retry_timeout_ms: 20_000,
    };
    backup_log_run_command(
        task.as_ptr(),
        START,
        &policy,
        Some(query_state),
        Some(execute_start),
        std::ptr::null_mut(),
    )
}

fn retry_records(task: &CString) -> Vec<SLogBackupRetryRecord> {
    let mut count = 0u32;
    let rc =
        backup_log_get_retry_records(task.as_ptr(), START, std::ptr::null_mut(), 0, &mut count);
    assert_eq!(rc, SUCCESS, "{}", last_error());
    // SAFETY: a plain C struct; all zeroes is a valid value.
    let mut out: Vec<SLogBackupRetryRecord> =
        (0..count).map(|_| unsafe { std::mem::zeroed() }).collect();
    let rc =
        backup_log_get_retry_records(task.as_ptr(), START, out.as_mut_ptr(), count, &mut count);
    assert_eq!(rc, SUCCESS, "{}", last_error());
    out.truncate(count as usize);
    out
}

#[test]
fn keys_and_log_commands_live_in_etcd_through_the_c_abi() {
    let _turn = turn();
    let cluster = Cluster::start(3);
    let prefix = unique_prefix("abi");
    init(&etcd_config(&cluster.endpoints(), &prefix));

    // Run, replay, conflict.
    let runs = AtomicU32::new(0);
    assert_eq!(
        execute("block-1", "payload-a", &runs),
        (SUCCESS, false),
        "{}",
        last_error()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        execute("block-1", "payload-a", &runs),
        (SUCCESS, true),
        "{}",
        last_error()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "a replay does not run op");
    let (rc, replayed) = execute("block-1", "payload-b", &runs);
    assert_eq!(rc, CONFLICT, "{}", last_error());
    assert!(!replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "a conflict does not run op");
    // The completion is in etcd, under the prefix, not in any local file.
    let stored = cluster.etcdctl(&["get", "--prefix", "--keys-only", &prefix]);
    assert!(!stored.trim().is_empty(), "nothing under {prefix} in etcd");

    // Forget: the key runs again, with any payload.
    let key = CString::new("block-1").unwrap();
    assert_eq!(
        backup_idempotency_forget(key.as_ptr()),
        SUCCESS,
        "{}",
        last_error()
    );
    assert_eq!(
        execute("block-1", "payload-b", &runs),
        (SUCCESS, false),
        "{}",
        last_error()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // A log-backup START that fails once, then succeeds: two executes, records cleared.
    let task = CString::new("log-task-1").unwrap();
    fresh_task();
    FAILS_LEFT.store(1, Ordering::SeqCst);
    assert_eq!(run_start(&task, 3), SUCCESS, "{}", last_error());
    assert_eq!(EXECUTES.load(Ordering::SeqCst), 2);
    assert!(
        retry_records(&task).is_empty(),
        "success clears the records"
    );

    // One that keeps failing: exhausted, its records readable from etcd, then reset.
    let task = CString::new("log-task-2").unwrap();
    fresh_task();
    FAILS_LEFT.store(u32::MAX, Ordering::SeqCst);
    assert_eq!(run_start(&task, 2), RETRY_EXHAUSTED, "{}", last_error());
    assert_eq!(
        EXECUTES.load(Ordering::SeqCst),
        3,
        "1 + max_retry_times attempts"
    );
    let records = retry_records(&task);
    assert_eq!(records.len(), 2, "one record per retry");
    for (n, r) in records.iter().enumerate() {
        assert_eq!(r.retry_num, n as u32 + 1);
        assert_eq!(r.reason_code, NETWORK);
        assert!(r.real_retry_at_ms > 0, "retry {} ran", r.retry_num);
    }
    assert_eq!(
        backup_log_reset_retry_records(task.as_ptr(), START),
        SUCCESS,
        "{}",
        last_error()
    );
    assert!(retry_records(&task).is_empty(), "reset removed them");

    // The store's counters are exposed.
    let text = metrics();
    let failovers = text
        .lines()
        .find(|l| l.starts_with("backup_state_store_failovers_total"))
        .unwrap_or_else(|| panic!("no backup_state_store_failovers_total in:\n{text}"));
    let value = failovers.rsplit(' ').next().unwrap();
    assert!(value.parse::<f64>().is_ok(), "{failovers}");
}

#[test]
fn init_needs_no_cluster_and_calls_fail_closed_until_it_is_back() {
    let _turn = turn();
    let mut cluster = Cluster::start(3);
    cluster.kill_all();
    let prefix = unique_prefix("down");
    init(&etcd_config(&cluster.endpoints(), &prefix));

    let runs = AtomicU32::new(0);
    let (rc, replayed) = execute("block-down", "payload", &runs);
    assert!(
        rc == NETWORK || rc == CONNECTION_LOST,
        "{rc}: {}",
        last_error()
    );
    assert!(!replayed);
    // Retried through the plugin's policy (`error_retry_max = 2`), then given up with the
    // store's own code, and counted once.
    let (mut errors, mut retries) = (0u64, 0u64);
    backup_plugin_get_error_stats(&mut errors, &mut retries);
    assert_eq!((errors, retries), (1, 2), "{}", last_error());
    assert!(
        last_error().contains("no claim was made: 2 retries failed"),
        "{}",
        last_error()
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "op never runs without a claim"
    );
    let task = CString::new("log-task-down").unwrap();
    // A log-backup command likewise: its run is retried, then given up with the store's
    // code; the task is neither queried nor executed.
    fresh_task();
    let rc = run_start(&task, 3);
    assert!(
        rc == NETWORK || rc == CONNECTION_LOST,
        "{rc}: {}",
        last_error()
    );
    backup_plugin_get_error_stats(&mut errors, &mut retries);
    assert_eq!((errors, retries), (2, 4), "{}", last_error());
    assert!(
        last_error().contains("nothing was run: 2 retries failed"),
        "{}",
        last_error()
    );
    assert_eq!(
        (
            QUERIES.load(Ordering::SeqCst),
            EXECUTES.load(Ordering::SeqCst)
        ),
        (0, 0),
        "nothing runs before the store answers"
    );
    // Reading or resetting the records, forgetting a key: each retried the same way.
    let key = CString::new("block-down").unwrap();
    let calls: [(&str, &dyn Fn() -> i32); 3] = [
        ("nothing was read", &|| {
            backup_log_get_retry_records(task.as_ptr(), START, std::ptr::null_mut(), 0, &mut 0)
        }),
        ("nothing was removed", &|| {
            backup_log_reset_retry_records(task.as_ptr(), START)
        }),
        ("nothing was forgotten", &|| {
            backup_idempotency_forget(key.as_ptr())
        }),
    ];
    for (nothing_done, call) in calls {
        let rc = call();
        assert!(
            rc == NETWORK || rc == CONNECTION_LOST,
            "{rc}: {}",
            last_error()
        );
        assert!(
            last_error().contains(&format!("{nothing_done}: 2 retries failed")),
            "{}",
            last_error()
        );
        let before = retries;
        backup_plugin_get_error_stats(&mut errors, &mut retries);
        assert_eq!(retries, before + 2, "{}", last_error());
    }

    // The cluster is back: the same plugin, without a new init, runs the key once.
    cluster.restart_all();
    assert_eq!(
        execute("block-down", "payload", &runs),
        (SUCCESS, false),
        "{}",
        last_error()
    );
    assert_eq!(
        execute("block-down", "payload", &runs),
        (SUCCESS, true),
        "{}",
        last_error()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // And the log-backup command runs.
    assert_eq!(run_start(&task, 3), SUCCESS, "{}", last_error());
    assert_eq!(EXECUTES.load(Ordering::SeqCst), 1);
}

#[test]
fn past_the_etcd_space_quota_calls_fail_closed_and_resume_after_compact_defrag_disarm() {
    let _turn = turn();
    // A 2 MiB quota; a log directory for the diagnostics.
    let cluster = Cluster::start_with_args(3, &["--quota-backend-bytes", "2097152"]);
    let logs = cluster.dir.path().join("plugin-logs");
    let prefix = unique_prefix("quota");
    init(&format!(
        "{}log_path = \"{}\"\nlog_level = \"info\"\n",
        etcd_config(&cluster.endpoints(), &prefix),
        logs.display()
    ));
    let runs = AtomicU32::new(0);
    for i in 0..5 {
        let (rc, replayed) = execute(&format!("before-{i}"), "payload", &runs);
        assert_eq!((rc, replayed), (SUCCESS, false), "{}", last_error());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 5);

    // etcd keeps every revision until compacted: rewriting one key fills the quota with
    // history until etcd refuses writes and raises its NOSPACE alarm.
    cluster.fill_past_quota(256 * 1024, |_| "/filler/history".to_string());
    assert!(cluster.etcdctl(&["alarm", "list"]).contains("NOSPACE"));

    // A new key fails closed: DISK_FULL, its op never runs, and the last error says why
    // and what the operator must do.
    let (rc, replayed) = execute("after-0", "payload", &runs);
    let message = last_error();
    assert_eq!(rc, DISK_FULL, "{message}");
    assert!(!replayed);
    for needed in [
        "quota",
        "NOSPACE",
        "etcdctl compact <revision> --physical",
        "etcdctl defrag --cluster",
        "etcdctl alarm disarm",
        "after-0",
    ] {
        assert!(message.contains(needed), "{needed:?} not in: {message}");
    }
    // A key completed earlier needs no write: it still replays, or conflicts.
    assert_eq!(
        execute("before-0", "payload", &runs),
        (SUCCESS, true),
        "{}",
        last_error()
    );
    assert_eq!(execute("before-1", "other payload", &runs).0, CONFLICT);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        5,
        "no op runs on a full cluster"
    );

    // The operator's recovery: compact the history, defragment every member, disarm.
    let full_size = cluster.status_field("dbSize");
    let revision = cluster.status_field("revision");
    cluster.etcdctl(&["compact", &revision.to_string(), "--physical"]);
    // etcdctl defrags each endpoint it is given: all members.
    cluster.etcdctl(&["defrag", "--command-timeout=30s"]);
    cluster.etcdctl(&["alarm", "disarm"]);
    assert!(
        !cluster.etcdctl(&["alarm", "list"]).contains("NOSPACE"),
        "the alarm is cleared"
    );
    let defragmented = cluster.status_field("dbSize");
    assert!(
        defragmented < full_size / 2,
        "defragmentation gave the space back: {full_size} -> {defragmented} bytes"
    );

    // Work resumes: the refused key runs once and replays; earlier keys still replay.
    let (rc, replayed) = execute("after-0", "payload", &runs);
    assert_eq!((rc, replayed), (SUCCESS, false), "{}", last_error());
    assert_eq!(runs.load(Ordering::SeqCst), 6);
    assert_eq!(execute("after-0", "payload", &runs), (SUCCESS, true));
    for i in 0..5 {
        let (rc, replayed) = execute(&format!("before-{i}"), "payload", &runs);
        assert_eq!((rc, replayed), (SUCCESS, true), "{}", last_error());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 6);

    // The diagnostics log has a clear line for it (cleanup flushes the log).
    backup_plugin_cleanup();
    let mut text = String::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    let line = text
        .lines()
        .find(|l| l.contains("NOSPACE") && l.contains("DISK_FULL"))
        .unwrap_or_else(|| panic!("no NOSPACE / DISK_FULL line in the diagnostics log:\n{text}"));
    assert!(
        line.contains("ERROR") && line.contains("quota") && line.contains("alarm disarm"),
        "{line}"
    );
    eprintln!("diagnostics: {line}");
}
