//! The operator's command line (docs/C_API.md §11) as a person runs it: the built
//! `backup-coordinator` program on a real file store that the plugin filled through its C
//! ABI, in this process and in a child process killed inside its operation.
//!
//! The plugin is one instance per process, so the tests of this file take turns. Child
//! processes are this test binary run again with `CLI_ROLE` set.

#[path = "common/etcd.rs"]
mod etcd_cluster;

use backup_coordinator::error::ErrorCode;
use backup_coordinator::ffi::idempotency::{
    backup_execute_idempotent, backup_execute_idempotent_fenced,
};
use backup_coordinator::ffi::log_backup::{backup_log_run_command, SLogBackupRetryPolicy};
use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_last_error, backup_plugin_init,
};
use backup_coordinator::idempotency::fingerprint;
use serde_json::Value;
use std::ffi::{c_void, CStr, CString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const SUCCESS: i32 = 0;

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the plugin for one test; cleans it up however the test ends.
struct Turn(#[allow(dead_code)] MutexGuard<'static, ()>);

fn turn() -> Turn {
    Turn(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Drop for Turn {
    fn drop(&mut self) {
        backup_plugin_cleanup();
    }
}

fn last_error() -> String {
    // SAFETY: the plugin returns a NUL-terminated string valid until our next call.
    unsafe { CStr::from_ptr(backup_plugin_get_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A bare plugin section: the store under `<dir>/state`, the diagnostics log in `<dir>/log`.
fn config_text(dir: &Path) -> String {
    format!(
        "state_dir = \"{}\"\nlog_path = \"{}\"\nidempotency_lease = \"60s\"\nidempotency_ttl = \"24h\"\nerror_retry_max = 0\n",
        dir.join("state").display(),
        dir.join("log").display()
    )
}

/// Writes the config file the program reads and inits the plugin with the same text.
fn init(dir: &Path) -> PathBuf {
    init_with(dir, &config_text(dir))
}

/// The same with `text`: `<dir>/plugin.toml`, which a child process inits with too.
fn init_with(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("plugin.toml");
    std::fs::write(&path, text).unwrap();
    let rc = backup_plugin_init(text.as_ptr() as *const _, text.len() as u32);
    assert_eq!(rc, SUCCESS, "init: {}", last_error());
    path
}

unsafe extern "C" fn returns(data: *mut c_void) -> i32 {
    data as usize as i32
}

/// Runs `key` with `payload` to completion (the operation returns `code`).
fn execute(key: &str, payload: &str, code: i32) -> i32 {
    let key = CString::new(key).unwrap();
    let mut replayed = false;
    backup_execute_idempotent(
        key.as_ptr(),
        payload.as_ptr() as *const c_void,
        payload.len(),
        Some(returns),
        code as usize as *mut c_void,
        &mut replayed,
    )
}

/// The token the last fenced operation of this process ran with.
static LAST_TOKEN: Mutex<u64> = Mutex::new(0);

unsafe extern "C" fn note_token(_: *mut c_void, token: u64) -> i32 {
    *LAST_TOKEN.lock().unwrap() = token;
    0
}

/// Prints its token, then sleeps until killed.
unsafe extern "C" fn hang(_: *mut c_void, token: u64) -> i32 {
    println!("RUNNING {token}");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
    0
}

/// A child process (inited with `<dir>/plugin.toml`) claims `stuck` and is SIGKILLed inside
/// its operation: its claim stays until its lease runs out. The claim's token.
fn claim_stuck_and_die(dir: &Path) -> u64 {
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "cli_child", "--nocapture", "--test-threads=1"])
            .env("CLI_ROLE", "owner")
            .env("CLI_DIR", dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    let token: u64 = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the child ended");
        // libtest may have printed "test cli_child ... " on the same line.
        if let Some(token) = line.split("RUNNING ").nth(1) {
            break token.trim().parse().unwrap();
        }
    };
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    token
}

/// A child process killed however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn execute_fenced(
    key: &str,
    payload: &str,
    op: unsafe extern "C" fn(*mut c_void, u64) -> i32,
) -> i32 {
    let key = CString::new(key).unwrap();
    let mut replayed = false;
    backup_execute_idempotent_fenced(
        key.as_ptr(),
        payload.as_ptr() as *const c_void,
        payload.len(),
        Some(op),
        std::ptr::null_mut(),
        &mut replayed,
    )
}

/// The body of a child process; a no-op in the normal test run.
#[test]
fn cli_child() {
    let Ok(role) = std::env::var("CLI_ROLE") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("CLI_DIR").unwrap());
    let text = std::fs::read_to_string(dir.join("plugin.toml")).unwrap();
    init_with(&dir, &text);
    match role.as_str() {
        // Claims `stuck` and hangs inside its operation (the parent kills it there).
        "owner" => {
            let rc = execute_fenced("stuck", "payload-stuck", hang);
            println!("RESULT {rc}");
        }
        other => panic!("unknown role {other}"),
    }
}

/// Runs the program with `--config FILE` and `args`.
fn run(config: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_backup-coordinator"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "$ backup-coordinator --config {} {}\n{}{}[exit {:?}]",
        config.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must exit 0; its stdout.
fn ok(config: &Path, args: &[&str]) -> String {
    let out = run(config, args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

/// Runs a command with `--json` that must exit `code`; its document.
fn json(config: &Path, args: &[&str], code: i32) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = run(config, &args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn keys_are_listed_shown_explained_and_forgotten() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    for i in 0..3 {
        assert_eq!(
            execute(&format!("job-{i}"), &format!("payload-{i}"), 0),
            SUCCESS
        );
    }
    assert_eq!(execute("other-1", "payload-o", 0), SUCCESS);
    // A failed operation leaves no record.
    assert_ne!(
        execute("failed", "p", ErrorCode::InvalidParam as i32),
        SUCCESS
    );

    let text = ok(&config, &["keys", "list"]);
    for key in ["job-0", "job-1", "job-2", "other-1"] {
        assert!(text.contains(key), "{text}");
    }
    assert!(
        !text.contains("failed") && text.contains("4 keys"),
        "{text}"
    );
    let listed = json(&config, &["keys", "list", "--prefix", "job-"], 0);
    assert_eq!(listed["count"], 3);
    let first = &listed["keys"][0];
    assert_eq!(first["key"], "job-0");
    assert_eq!(first["state"], "completed");
    assert_eq!(first["result"], 0);
    assert_eq!(first["fingerprint"], hex(&fingerprint(b"payload-0")));
    assert!(first["token"].as_u64().unwrap() > 0);
    assert!(first["owner"].is_null());
    let claimed = json(&config, &["keys", "list", "--state", "claimed"], 0);
    assert_eq!(claimed["count"], 0);
    let old = json(&config, &["keys", "list", "--older-than", "1h"], 0);
    assert_eq!(old["count"], 0);

    let token = first["token"].as_u64().unwrap();
    let shown = ok(&config, &["keys", "show", "job-0"]);
    assert!(shown.contains(&format!("token:        {token}")), "{shown}");
    assert!(shown.contains(&hex(&fingerprint(b"payload-0"))), "{shown}");
    assert!(shown.contains("completed (result 0)"), "{shown}");

    let why = ok(&config, &["keys", "why", "job-0"]);
    assert!(
        why.contains("would not run now") && why.contains("completed"),
        "{why}"
    );
    let other = hex(&fingerprint(b"another payload"));
    let why = json(
        &config,
        &["keys", "why", "job-0", "--fingerprint", &other],
        0,
    );
    assert_eq!(why["runs_now"], false);
    assert!(
        why["why"]
            .as_str()
            .unwrap()
            .contains("completed with another fingerprint"),
        "{why}"
    );
    let why = json(&config, &["keys", "why", "never-seen"], 0);
    assert_eq!(why["runs_now"], true);
    assert_eq!(why["state"], "absent");

    // Forgotten: a call runs it again; the change is logged with its reason.
    let out = run(
        &config,
        &["keys", "forget", "job-1", "--reason", "re-run the batch"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("re-run the batch"),
        "{}",
        stderr(&out)
    );
    let log = std::fs::read_to_string(backup_coordinator::diagnostics::file_for(
        &dir.path().join("log"),
        &backup_coordinator::diagnostics::utc_date_now(),
    ))
    .unwrap_or_default();
    assert!(
        log.contains("forgot job-1") && log.contains("re-run the batch"),
        "diagnostics log:\n{log}"
    );
    let absent = run(&config, &["keys", "forget", "job-1", "--reason", "again"]);
    assert_eq!(absent.status.code(), Some(1));
    assert!(stderr(&absent).contains("no record"), "{}", stderr(&absent));
    assert_eq!(json(&config, &["keys", "list"], 0)["count"], 3);
}

#[test]
fn a_killed_owners_claim_is_released_only_with_its_token_and_fenced() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    backup_plugin_cleanup();
    let token = claim_stuck_and_die(dir.path());

    let shown = json(&config, &["keys", "show", "stuck"], 0);
    assert_eq!(shown["state"], "claimed");
    assert_eq!(shown["token"], token);
    assert!(shown["lease_left_ms"].as_u64().unwrap() > 30_000, "{shown}");
    let why = ok(&config, &["keys", "why", "stuck"]);
    assert!(
        why.contains(&format!("claimed by token {token}, lease left"))
            && why.contains("owner unknown"),
        "{why}"
    );
    // Never forgotten while claimed.
    let refused = run(&config, &["keys", "forget", "stuck", "--reason", "x"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("claimed"), "{}", stderr(&refused));
    // The wrong token: refused, nothing changed.
    let wrong = (token + 1).to_string();
    let refused = run(&config, &["keys", "release", "stuck", "--if-token", &wrong]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains(&format!("not released: the key's claim has token {token}")),
        "{}",
        stderr(&refused)
    );
    assert_eq!(json(&config, &["keys", "show", "stuck"], 0)["token"], token);
    // The right one: released, and logged with the reason.
    let released = json(
        &config,
        &[
            "keys",
            "release",
            "stuck",
            "--if-token",
            &token.to_string(),
            "--reason",
            "pid 4242 is gone",
        ],
        0,
    );
    assert_eq!(released["released"], true);
    assert_eq!(
        json(&config, &["keys", "show", "stuck"], 0)["state"],
        "absent"
    );
    let log = std::fs::read_to_string(backup_coordinator::diagnostics::file_for(
        &dir.path().join("log"),
        &backup_coordinator::diagnostics::utc_date_now(),
    ))
    .unwrap_or_default();
    eprintln!("diagnostics log:\n{log}");
    assert!(log.contains("pid 4242 is gone"), "diagnostics log:\n{log}");
    // The next claim's token is higher: the killed owner's fenced writes are refused.
    init(dir.path());
    assert_eq!(
        execute_fenced("stuck", "payload-stuck", note_token),
        SUCCESS,
        "{}",
        last_error()
    );
    let next = *LAST_TOKEN.lock().unwrap();
    assert!(
        next > token,
        "next claim's token {next} <= released {token}"
    );
    let shown = json(&config, &["keys", "show", "stuck"], 0);
    assert_eq!(shown["state"], "completed");
    assert_eq!(shown["token"], next);
}

fn quick_policy() -> SLogBackupRetryPolicy {
    SLogBackupRetryPolicy {
        max_retry_times: 2,
        min_retry_duration_ms: 1,
        max_retry_duration_ms: 1,
        retry_timeout_ms: 60_000,
    }
}

unsafe extern "C" fn state_not_exist(_: *mut c_void, state: *mut i32, truncated: *mut bool) -> i32 {
    // SAFETY: the plugin passes valid out-pointers.
    unsafe {
        *state = 1; // NOT_EXIST
        *truncated = false;
    }
    0
}

unsafe extern "C" fn network_fails(_: *mut c_void, _command: i32) -> i32 {
    ErrorCode::Network as i32
}

#[test]
fn log_backup_records_are_listed_shown_and_reset() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let task = CString::new("task-7").unwrap();
    let policy = quick_policy();
    let rc = backup_log_run_command(
        task.as_ptr(),
        0,
        &policy,
        Some(state_not_exist),
        Some(network_fails),
        std::ptr::null_mut(),
    );
    assert_ne!(rc, SUCCESS);
    let text = ok(&config, &["records", "list"]);
    assert!(text.contains("task-7") && text.contains("start"), "{text}");
    let listed = json(&config, &["records", "list"], 0);
    assert_eq!(listed["count"], 1);
    assert_eq!(listed["records"][0]["task"], "task-7");
    assert_eq!(listed["records"][0]["command"], "start");
    assert!(!listed["records"][0]["records"]
        .as_array()
        .unwrap()
        .is_empty());
    let shown = ok(&config, &["records", "show", "task-7"]);
    assert!(shown.contains("task-7 start:"), "{shown}");
    let shown = json(&config, &["records", "show", "task-7", "start"], 0);
    assert_eq!(shown["records"][0]["finished"], true);
    let reset = json(
        &config,
        &[
            "records",
            "reset",
            "task-7",
            "start",
            "--reason",
            "task recreated",
        ],
        0,
    );
    assert_eq!(reset["reset"], true);
    assert_eq!(json(&config, &["records", "list"], 0)["count"], 0);
    let bad = run(&config, &["records", "reset", "task-7", "restart"]);
    assert_eq!(bad.status.code(), Some(2), "not a command: usage");
}

#[test]
fn the_store_is_counted_compacted_and_verified() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    for i in 0..50 {
        assert_eq!(execute(&format!("k-{i}"), "p", 0), SUCCESS);
    }
    let stats = json(&config, &["store", "stats"], 0);
    assert_eq!(stats["keys"], 50);
    assert_eq!(stats["completed"], 50);
    let before = stats["journal_bytes"].as_u64().unwrap();
    assert!(stats["bytes_per_key"].as_u64().unwrap() >= 90, "{stats}");
    for i in 0..40 {
        ok(
            &config,
            &["keys", "forget", &format!("k-{i}"), "--reason", "drop"],
        );
    }
    let compacted = json(
        &config,
        &["store", "compact", "--reason", "after cleanup"],
        0,
    );
    assert_eq!(compacted["compacted"], true);
    assert!(compacted["before_bytes"].as_u64().unwrap() > before);
    let after = compacted["after_bytes"].as_u64().unwrap();
    assert!(after < before / 4, "{before} -> {after}");
    let stats = json(&config, &["store", "stats"], 0);
    assert_eq!(stats["keys"], 10);
    let text = ok(&config, &["store", "stats"]);
    assert!(text.contains("10 live (0 claimed, 10 completed)"), "{text}");
    // The plugin goes on with the compacted journal.
    assert_eq!(execute("k-45", "p", 0), SUCCESS);
    assert_eq!(execute("k-1", "p", 0), SUCCESS);
    backup_plugin_cleanup();

    let text = ok(&config, &["store", "verify"]);
    assert!(text.ends_with("OK\n"), "{text}");
    let verified = json(&config, &["store", "verify"], 0);
    assert_eq!(verified["ok"], true);
    // The 10 kept, and k-1's new claim and completion (k-45 replayed: no record).
    assert!(verified["records"].as_u64().unwrap() >= 12, "{verified}");
    // A byte of the second record flipped: found, named by file and offset.
    let journal = dir.path().join("state/idempotency/journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    let second = 2 + (8 + 4 + 8 + 32) + bytes[1] as usize + 4;
    bytes[second + 9] ^= 0x40;
    std::fs::write(&journal, &bytes).unwrap();
    let out = run(&config, &["store", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let why = stderr(&out);
    assert!(
        why.contains(&journal.display().to_string()) && why.contains(&format!("byte {second}")),
        "{why}"
    );
}

#[test]
fn configs_are_checked_as_init_reads_them() {
    let demo =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/incremental_bitmap/demo/taosx.toml");
    let text = ok(&demo, &["config", "check"]);
    assert!(text.contains("valid"), "{text}");
    let checked = json(&demo, &["config", "check"], 0);
    assert_eq!(checked["ok"], true);
    assert_eq!(checked["state_dir"], "/var/lib/taos/taosx/backup_state");

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("taosx.toml");
    std::fs::write(
        &broken,
        "data_dir = \"/var/lib/taos/taosx\"\n\n[plugins.incremental_bitmap]\nenable = true\n  error_retry_interval = \"5 parsecs\"\n",
    )
    .unwrap();
    let out = run(&broken, &["config", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let why = stderr(&out);
    assert!(
        why.contains("key `error_retry_interval`") && why.contains("line 5, column 3"),
        "{why}"
    );
    std::fs::write(&broken, "[plugins.incremental_bitmap]\nenable = = true\n").unwrap();
    let out = run(&broken, &["config", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("line 2, column"), "{}", stderr(&out));
    // Other commands refuse a bad config with the same message.
    let out = run(&broken, &["keys", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("line 2, column"), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_2() {
    let config = Path::new("/nonexistent.toml");
    for args in [
        &["keys", "bogus"][..],
        &["keys", "release", "k"][..],
        &["keys", "release", "k", "--if-token", "x"][..],
        &["keys", "forget", "k"][..],
        &["keys", "list", "--state", "running"][..],
        &["keys", "list", "--older-than", "5 parsecs"][..],
    ] {
        let out = run(config, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_backup-coordinator"))
        .args(["keys", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--config is required");
    // A config that cannot be read: refused, not usage.
    let out = run(config, &["keys", "list"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn keys_on_etcd_are_listed_shown_and_released() {
    let _turn = turn();
    let cluster = etcd_cluster::Cluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("/taosx/cli-test-{}-{nanos}/", std::process::id());
    let endpoints = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "state_backend = \"etcd\"\netcd_endpoints = [{endpoints}]\netcd_prefix = \"{prefix}\"\n\
         idempotency_lease = \"30s\"\nerror_retry_max = 0\nlog_path = \"{}\"\n",
        dir.path().join("log").display()
    );
    let config = init_with(dir.path(), &text);
    assert_eq!(execute("e-1", "payload-1", 0), SUCCESS, "{}", last_error());
    assert_eq!(execute("e/2 with space", "payload-2", 0), SUCCESS);
    let task = CString::new("etcd-task").unwrap();
    let policy = quick_policy();
    let rc = backup_log_run_command(
        task.as_ptr(),
        0,
        &policy,
        Some(state_not_exist),
        Some(network_fails),
        std::ptr::null_mut(),
    );
    assert_ne!(rc, SUCCESS);
    backup_plugin_cleanup();
    let token = claim_stuck_and_die(dir.path());

    let listed = json(&config, &["keys", "list"], 0);
    assert_eq!(listed["count"], 3, "{listed}");
    let keys: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["e-1", "e/2 with space", "stuck"]);
    // etcd keeps the first 16 bytes of a fingerprint (C_API §9).
    assert_eq!(
        listed["keys"][0]["fingerprint"],
        hex(&fingerprint(b"payload-1")[..16])
    );
    assert_eq!(listed["keys"][2]["state"], "claimed");
    assert_eq!(listed["keys"][2]["token"], token);
    let claimed = json(&config, &["keys", "list", "--state", "claimed"], 0);
    assert_eq!(claimed["count"], 1);
    let text = ok(&config, &["keys", "list", "--prefix", "e"]);
    assert!(text.contains("2 keys"), "{text}");

    let records = json(&config, &["records", "list"], 0);
    assert_eq!(records["count"], 1, "{records}");
    assert_eq!(records["records"][0]["task"], "etcd-task");
    let shown = json(&config, &["records", "show", "etcd-task"], 0);
    assert_eq!(
        shown["records"][0]["command"],
        records["records"][0]["command"]
    );

    let shown = json(&config, &["keys", "show", "stuck"], 0);
    assert_eq!(shown["token"], token);
    assert!(shown["lease_left_ms"].as_u64().unwrap() > 10_000, "{shown}");
    let why = ok(&config, &["keys", "why", "stuck"]);
    assert!(why.contains(&format!("claimed by token {token}")), "{why}");

    let wrong = (token ^ 1).to_string();
    let refused = run(&config, &["keys", "release", "stuck", "--if-token", &wrong]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains(&format!("the key's claim has token {token}")),
        "{}",
        stderr(&refused)
    );
    let released = json(
        &config,
        &[
            "keys",
            "release",
            "stuck",
            "--if-token",
            &token.to_string(),
            "--reason",
            "host down",
        ],
        0,
    );
    assert_eq!(released["released"], true);
    assert_eq!(
        json(&config, &["keys", "show", "stuck"], 0)["state"],
        "absent"
    );
    // The key runs again at once, as a new claim.
    init_with(dir.path(), &std::fs::read_to_string(&config).unwrap());
    assert_eq!(
        execute_fenced("stuck", "payload-stuck", note_token),
        SUCCESS,
        "{}",
        last_error()
    );
    // Its token (the new claim's revision) is higher: the released owner is fenced.
    let next = *LAST_TOKEN.lock().unwrap();
    assert!(
        next > token,
        "next claim's token {next} <= released {token}"
    );
    backup_plugin_cleanup();
    drop(cluster);
}
