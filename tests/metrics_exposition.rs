//! `backup_plugin_get_metrics` read as a scraper reads it: after activity that moves every
//! family, the text goes through two real parsers, Prometheus's own `promtool check metrics`
//! and the Python `prometheus_client` parser (Debian's `prometheus` and
//! `python3-prometheus-client`, which the test installs itself when missing, see
//! common/tools.rs), and each family must come out with its type and all its samples.
//!
//! The plugin is one per process: the tests of this file take turns through `PLUGIN`.
//! The idempotency take-over needs an owner that died: a child process (this test binary run
//! again with `METRICS_ROLE` set) claims a key and is killed with SIGKILL.

mod common;

use backup_coordinator::ffi::idempotency::backup_execute_idempotent;
use backup_coordinator::ffi::log_backup::{backup_log_run_command, SLogBackupRetryPolicy};
use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_execute_with_retry, backup_plugin_get_error_stats,
    backup_plugin_get_metrics, backup_plugin_init, backup_plugin_record_error,
};
use common::child::Child;
use std::collections::BTreeMap;
use std::ffi::{c_void, CString};
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static PLUGIN: Mutex<()> = Mutex::new(());

const START: i32 = 0;
const STOP: i32 = 1;
const PAUSE: i32 = 2;
const NOT_EXIST: i32 = 1;
const RUNNING: i32 = 2;
const PAUSED: i32 = 3;

fn init(config: &str) {
    backup_plugin_cleanup();
    assert_eq!(
        backup_plugin_init(config.as_ptr() as *const _, config.len() as u32),
        0,
        "init with {config}"
    );
}

/// The text, fetched the way the header documents: ask the length, then copy.
fn metrics() -> String {
    let mut len = 0usize;
    assert_eq!(
        backup_plugin_get_metrics(std::ptr::null_mut(), 0, &mut len),
        -1
    );
    let mut buffer = vec![0u8; len + 1];
    assert_eq!(
        backup_plugin_get_metrics(buffer.as_mut_ptr() as *mut _, buffer.len(), &mut len),
        0
    );
    buffer.truncate(len);
    String::from_utf8(buffer).unwrap()
}

fn stats() -> (u64, u64) {
    let (mut errors, mut retries) = (0, 0);
    backup_plugin_get_error_stats(&mut errors, &mut retries);
    (errors, retries)
}

/// A scripted task: its state, and how many executes fail with which code.
struct Task {
    state: i32,
    fail_with: i32,
    fail_times: AtomicU32,
    executes: AtomicU32,
}

impl Task {
    fn new(state: i32, fail_with: i32, fail_times: u32) -> Task {
        Task {
            state,
            fail_with,
            fail_times: AtomicU32::new(fail_times),
            executes: AtomicU32::new(0),
        }
    }
}

unsafe extern "C" fn query(user: *mut c_void, state: *mut i32, truncated: *mut bool) -> i32 {
    let task = &*(user as *const Task);
    *state = task.state;
    *truncated = false;
    0
}

unsafe extern "C" fn execute(user: *mut c_void, _command: i32) -> i32 {
    let task = &*(user as *const Task);
    task.executes.fetch_add(1, Ordering::SeqCst);
    let left = task.fail_times.load(Ordering::SeqCst);
    if left > 0 {
        task.fail_times.store(left - 1, Ordering::SeqCst);
        return task.fail_with;
    }
    0
}

fn run(task_name: &str, command: i32, policy: &SLogBackupRetryPolicy, task: &Task) -> i32 {
    let name = CString::new(task_name).unwrap();
    backup_log_run_command(
        name.as_ptr(),
        command,
        policy,
        Some(query),
        Some(execute),
        task as *const Task as *mut c_void,
    )
}

const FAST: SLogBackupRetryPolicy = SLogBackupRetryPolicy {
    max_retry_times: 1,
    min_retry_duration_ms: 1,
    max_retry_duration_ms: 10,
    retry_timeout_ms: 60_000,
};

/// Fails once with NETWORK, then succeeds.
unsafe extern "C" fn flaky_op(user: *mut c_void) -> i32 {
    let calls = &*(user as *const AtomicU32);
    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
        -6
    } else {
        0
    }
}

/// Always fails with NETWORK: its retries run out.
unsafe extern "C" fn down_op(_: *mut c_void) -> i32 {
    -6
}

unsafe extern "C" fn ok_op(_: *mut c_void) -> i32 {
    0
}

/// Holds its key until released: `.0` says it started, `.1` releases it.
unsafe extern "C" fn held_op(user: *mut c_void) -> i32 {
    let flags = &*(user as *const (AtomicBool, AtomicBool));
    flags.0.store(true, Ordering::SeqCst);
    while !flags.1.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    0
}

/// Runs forever once it holds its key, after saying so in a file (the child's op).
unsafe extern "C" fn claim_and_hang(_: *mut c_void) -> i32 {
    let dir = std::env::var("METRICS_DIR").unwrap();
    fs::write(Path::new(&dir).join("claimed"), b"").unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn idempotent(
    key: &str,
    payload: &[u8],
    op: unsafe extern "C" fn(*mut c_void) -> i32,
    user: *mut c_void,
) -> i32 {
    let key = CString::new(key).unwrap();
    backup_execute_idempotent(
        key.as_ptr(),
        payload.as_ptr() as *const c_void,
        payload.len(),
        Some(op),
        user,
        std::ptr::null_mut(),
    )
}

fn config(dir: &Path) -> String {
    format!(
        "state_dir = \"{}\"\nerror_store_path = \"{}\"\nerror_retry_max = 3\nerror_retry_interval = \"1ms\"\nidempotency_lease = \"1s\"\n",
        dir.join("state").display(),
        dir.join("errors").display()
    )
}

/// The child's body: claim "orphan" and hang until killed. A no-op in the normal run.
#[test]
fn child_role() {
    let Ok(dir) = std::env::var("METRICS_DIR") else {
        return;
    };
    // Not the parent's error_store_path: the parent turned it into a plain file, which
    // init refuses.
    let state = Path::new(&dir).join("state");
    init(&format!(
        "state_dir = \"{}\"\nidempotency_lease = \"1s\"\n",
        state.display()
    ));
    idempotent("orphan", b"p", claim_and_hang, std::ptr::null_mut());
    unreachable!("the op never returns");
}

/// A key whose owner died: a child claims it and is killed; after its 1 s lease the next
/// call takes the key over.
fn take_over_a_dead_owners_key(dir: &Path) {
    let mut child = Child::command("child_role")
        .env("METRICS_DIR", dir)
        .no_stdout()
        .no_stderr()
        .spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("claimed").exists() {
        assert!(Instant::now() < deadline, "the child never claimed its key");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill();
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(idempotent("orphan", b"p", ok_op, std::ptr::null_mut()), 0);
}

/// Activity that moves every family of the exposition.
fn touch_every_family(dir: &Path) {
    init(&config(dir));
    // backup_error_log_write_failures_total: the log directory (if init created it)
    // replaced by a plain file before the first line, so that every line fails.
    let _ = fs::remove_dir_all(dir.join("errors"));
    fs::write(dir.join("errors"), b"not a directory").unwrap();
    // backup_errors_total, backup_retries_total: one recorded error, one retried operation.
    backup_plugin_record_error(-5, std::ptr::null());
    let calls = AtomicU32::new(0);
    assert_eq!(
        backup_plugin_execute_with_retry(Some(flaky_op), &calls as *const _ as *mut c_void),
        0
    );
    // backup_retries_exhausted_total: an operation whose retries run out.
    assert_eq!(
        backup_plugin_execute_with_retry(Some(down_op), std::ptr::null_mut()),
        -12
    );

    // Log-backup commands: a skip, a state sync (START on PAUSED), a retry then a recovery,
    // an exhaustion (retries with reason -11, a duration observed; backup_retries_exhausted_total).
    assert_eq!(run("t-skip", START, &FAST, &Task::new(RUNNING, 0, 0)), 0);
    assert_eq!(run("t-sync", START, &FAST, &Task::new(PAUSED, 0, 0)), 0);
    assert_eq!(run("t-retry", STOP, &FAST, &Task::new(RUNNING, -6, 1)), 0);
    assert_eq!(
        run("t-gone", PAUSE, &FAST, &Task::new(RUNNING, -11, 100)),
        -12
    );
    // backup_state_store_errors_total: the records of "t-gone" corrupted, then read.
    for entry in fs::read_dir(dir.join("state/log_backup")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rec") {
            fs::write(&path, b"garbage\n").unwrap();
        }
    }
    assert_eq!(run("t-gone", PAUSE, &FAST, &Task::new(RUNNING, 0, 0)), -8);

    // Idempotency: a claim, a replay, a conflict, an in-progress refusal, a take-over.
    assert_eq!(idempotent("k", b"one", ok_op, std::ptr::null_mut()), 0);
    assert_eq!(idempotent("k", b"one", ok_op, std::ptr::null_mut()), 0);
    assert_eq!(idempotent("k", b"two", ok_op, std::ptr::null_mut()), -15);
    let flags = (AtomicBool::new(false), AtomicBool::new(false));
    std::thread::scope(|s| {
        let owner =
            s.spawn(|| idempotent("busy", b"x", held_op, &flags as *const _ as *mut c_void));
        while !flags.0.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(idempotent("busy", b"x", ok_op, std::ptr::null_mut()), -14);
        flags.1.store(true, Ordering::SeqCst);
        assert_eq!(owner.join().unwrap(), 0);
    });
    take_over_a_dead_owners_key(dir);

    // The etcd backend's counters, through the API it calls.
    backup_coordinator::metrics::store().failovers.inc();
    backup_coordinator::metrics::store().unknown_outcomes.inc();
}

/// `promtool check metrics`: Prometheus's own parser and linter; any finding fails.
fn promtool_check(text: &str) {
    // Only promtool is wanted from `prometheus`; its server is kept from starting.
    common::ensure_tool("promtool", &["prometheus"]);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool was just ensured");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One sample as `prometheus_client` parsed it.
#[derive(Debug, Clone, PartialEq)]
struct Parsed {
    family: String,
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

const PY_PARSER: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print("\t".join([family.name, family.type, s.name, labels, repr(float(s.value))]))
"#;

/// Every sample through the Python `prometheus_client` parser, as a scraper reads it.
fn python_parse(text: &str) -> Vec<Parsed> {
    common::ensure_python_module(
        "prometheus_client",
        &["python3", "python3-prometheus-client"],
    );
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PY_PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("Debian's python3 was just ensured");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client (Debian python3-prometheus-client) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            Parsed {
                family: f[0].into(),
                kind: f[1].into(),
                name: f[2].into(),
                labels: f[3]
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once('=').unwrap();
                        (k.into(), v.into())
                    })
                    .collect(),
                value: f[4].parse().unwrap(),
            }
        })
        .collect()
}

/// The value of the sample `name` with exactly `labels`.
fn value(samples: &[Parsed], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<&Parsed> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == want)
        .collect();
    assert_eq!(found.len(), 1, "one sample {name}{labels:?}");
    found[0].value
}

#[test]
fn after_activity_in_every_family_real_parsers_read_the_metrics_as_written() {
    let _turn = PLUGIN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    touch_every_family(dir.path());
    let text = metrics();
    promtool_check(&text);
    let samples = python_parse(&text);

    // Every sample lands in a typed family of its own name (the bug: samples read as
    // untyped families because their TYPE lines came too early).
    let mut kinds = BTreeMap::new();
    for s in &samples {
        assert_ne!(s.kind, "unknown", "{} read as untyped:\n{text}", s.name);
        kinds.insert(s.family.clone(), s.kind.clone());
    }
    let sample_count = text.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(samples.len(), sample_count, "every sample line parsed");
    let expected: BTreeMap<String, String> = [
        ("backup_errors", "counter"),
        ("backup_retries", "counter"),
        ("backup_retries_exhausted", "counter"),
        ("backup_error_log_write_failures", "counter"),
        ("backup_log_command_retries", "counter"),
        ("backup_log_command_recoveries", "counter"),
        ("backup_log_command_skips", "counter"),
        ("backup_log_command_state_syncs", "counter"),
        ("backup_log_command_retry_duration_seconds", "histogram"),
        ("backup_idempotency_claims", "counter"),
        ("backup_idempotency_replays", "counter"),
        ("backup_idempotency_conflicts", "counter"),
        ("backup_idempotency_in_progress", "counter"),
        ("backup_idempotency_takeovers", "counter"),
        ("backup_idempotency_leases_lost", "counter"),
        ("backup_state_store_errors", "counter"),
        ("backup_state_store_failovers", "counter"),
        ("backup_state_store_unknown_outcomes", "counter"),
    ]
    .iter()
    .map(|(f, k)| (f.to_string(), k.to_string()))
    .collect();
    assert_eq!(kinds, expected);

    // The values, as the parser read them, are what happened.
    let (errors, retries) = stats();
    assert_eq!(value(&samples, "backup_errors_total", &[]), errors as f64);
    assert_eq!(value(&samples, "backup_retries_total", &[]), retries as f64);
    // What gave up: the operation that always failed, and PAUSE of "t-gone".
    assert_eq!(value(&samples, "backup_retries_exhausted_total", &[]), 2.0);
    assert_eq!(
        value(&samples, "backup_error_log_write_failures_total", &[]),
        errors as f64,
        "every recorded error's line failed"
    );
    let v = |name, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert_eq!(
        v(
            "backup_log_command_retries_total",
            &[("command", "stop"), ("reason", "-6")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "backup_log_command_retries_total",
            &[("command", "pause"), ("reason", "-11")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "backup_log_command_recoveries_total",
            &[("command", "stop")]
        ),
        1.0
    );
    assert_eq!(
        v("backup_log_command_skips_total", &[("command", "start")]),
        1.0
    );
    assert_eq!(
        v(
            "backup_log_command_state_syncs_total",
            &[("command", "start"), ("state", "paused")]
        ),
        1.0
    );
    // Two sequences with retries ended (stop recovered, pause exhausted), well under 1 s.
    for command in ["stop", "pause"] {
        let c = [("command", command)];
        assert_eq!(
            v("backup_log_command_retry_duration_seconds_count", &c),
            1.0
        );
        assert_eq!(
            v(
                "backup_log_command_retry_duration_seconds_bucket",
                &[("command", command), ("le", "1")]
            ),
            1.0
        );
        assert!(v("backup_log_command_retry_duration_seconds_sum", &c) < 1.0);
    }
    for (family, expected) in [
        ("claims", 3.0),
        ("replays", 1.0),
        ("conflicts", 1.0),
        ("in_progress", 1.0),
        ("takeovers", 1.0),
    ] {
        assert_eq!(
            value(&samples, &format!("backup_idempotency_{family}_total"), &[]),
            expected,
            "{family}"
        );
    }
    assert!(v("backup_state_store_errors_total", &[("code", "-8")]) >= 1.0);
    assert!(v("backup_state_store_failovers_total", &[]) >= 1.0);
    assert!(v("backup_state_store_unknown_outcomes_total", &[]) >= 1.0);
    backup_plugin_cleanup();
}

/// C_API §4, issue 15 item 5: a sequence cancelled by cleanup during its wait, resumed after a
/// new init, makes its retry in the new life: counted there, in `retry_count` and in the
/// metrics, and never in the life whose wait was cancelled.
#[test]
fn a_retry_made_after_a_cancelled_wait_is_counted_by_the_process_that_made_it() {
    let _turn = PLUGIN.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = format!("state_dir = \"{}\"\n", dir.path().display());
    init(&config);
    let policy = SLogBackupRetryPolicy {
        max_retry_times: 3,
        min_retry_duration_ms: 1_500,
        max_retry_duration_ms: 10_000,
        retry_timeout_ms: 600_000,
    };
    let task = Task::new(NOT_EXIST, -6, 1);
    let cleanup = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(300));
        backup_plugin_cleanup();
    });
    assert_eq!(run("resumed", START, &policy, &task), -16, "cancelled");
    cleanup.join().unwrap();
    assert_eq!(task.executes.load(Ordering::SeqCst), 1);

    init(&config);
    assert_eq!(stats(), (0, 0), "a new init starts from zero");
    assert_eq!(run("resumed", START, &policy, &task), 0);
    assert_eq!(
        task.executes.load(Ordering::SeqCst),
        2,
        "the retry was made"
    );
    assert_eq!(stats(), (0, 1), "and counted by this life");
    let samples = python_parse(&metrics());
    let v = |name, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert_eq!(
        v(
            "backup_log_command_retries_total",
            &[("command", "start"), ("reason", "-6")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "backup_log_command_recoveries_total",
            &[("command", "start")]
        ),
        1.0
    );
    // From the first failure (before the cancelled wait) to the success: the whole 1.5 s
    // wait, across both lives.
    let c = [("command", "start")];
    assert_eq!(
        v("backup_log_command_retry_duration_seconds_count", &c),
        1.0
    );
    assert!(v("backup_log_command_retry_duration_seconds_sum", &c) >= 1.5);
    assert_eq!(
        v(
            "backup_log_command_retry_duration_seconds_bucket",
            &[("command", "start"), ("le", "1")]
        ),
        0.0
    );
    backup_plugin_cleanup();
}
