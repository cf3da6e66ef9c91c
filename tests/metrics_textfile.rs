//! `metrics_textfile` and `metrics_interval` (C_API §5) as a host meets them, through the C
//! entry points: the file is rewritten every interval with the exposition of
//! `backup_plugin_get_metrics`, 0640 whatever the umask, readable by `promtool check
//! metrics`, with no temp file left; cleanup wakes the thread at once for a final write and
//! joins it (C_API §4); failed rewrites are counted and logged, never fatal; without the key no
//! thread runs and no file is written; bad values fail init with INVALID_PARAM naming the key.
//!
//! One plugin per process, and the umask is process-wide: the tests take turns.
mod common;
use common::tools;

use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_last_error, backup_plugin_get_metrics,
    backup_plugin_init, backup_plugin_record_error,
};
use std::ffi::CStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const INVALID_PARAM: i32 = -1;
const THREAD: &str = "backup-metrics";

static TURN: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    let guard = TURN.lock().unwrap_or_else(|e| e.into_inner());
    backup_plugin_cleanup();
    guard
}

fn init(config: &str) -> i32 {
    backup_plugin_init(config.as_ptr() as *const _, config.len() as u32)
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(backup_plugin_get_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The exposition, as `backup_plugin_get_metrics` hands it out.
fn metrics() -> String {
    let mut len = 0usize;
    backup_plugin_get_metrics(std::ptr::null_mut(), 0, &mut len);
    let mut buffer = vec![0u8; len + 1];
    assert_eq!(
        backup_plugin_get_metrics(buffer.as_mut_ptr() as *mut _, buffer.len(), &mut len),
        0
    );
    buffer.truncate(len);
    String::from_utf8(buffer).unwrap()
}

/// The value of the unlabelled sample `name` in `text`.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The threads of this process named `backup-metrics`.
fn metrics_threads() -> usize {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == THREAD)
        .count()
}

/// Polls `done` until it holds; fails after 30 s (many times the 1 s interval, for a loaded
/// machine), saying what was awaited.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After cleanup: no `backup-metrics` thread. A joined thread's task may linger in /proc for
/// the moment between its exit waking the joiner and the kernel releasing it: a short wait.
fn thread_gone() {
    let deadline = Instant::now() + Duration::from_secs(2);
    while metrics_threads() != 0 {
        assert!(
            Instant::now() < deadline,
            "a backup-metrics thread outlived cleanup"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// `promtool check metrics`: Prometheus's own parser and linter; any finding fails.
fn promtool_check(text: &str) {
    let promtool = tools::require("promtool", "prometheus");
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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

fn textfile_config(file: &Path, interval: &str) -> String {
    format!(
        "metrics_textfile = \"{}\"\nmetrics_interval = \"{interval}\"\n",
        file.display()
    )
}

#[test]
fn the_file_is_rewritten_every_interval_0640_whatever_the_umask_and_promtool_reads_it() {
    let _turn = turn();
    // SAFETY: umask(2) only sets the process's mask; restored below.
    let old_umask = unsafe { libc::umask(0o077) };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup_coordinator.prom");
    // A file of another mode in the way is replaced by a 0640 one.
    fs::write(&file, "stale 1\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();

    assert_eq!(init(&textfile_config(&file, "1s")), 0, "{}", last_error());
    // The thread names itself once it runs: a moment after init returns.
    wait_until("one backup-metrics thread runs", || metrics_threads() == 1);
    wait_until("the first write", || {
        sample(&read(&file), "backup_errors_total") == Some(0)
    });
    backup_plugin_record_error(-5, std::ptr::null());
    wait_until("a rewrite shows the recorded error", || {
        sample(&read(&file), "backup_errors_total") == Some(1)
    });
    assert_eq!(mode(&file), 0o640);
    let text = read(&file);
    // Nothing moved since: the file is what backup_plugin_get_metrics returns.
    assert_eq!(text, metrics());
    assert_eq!(
        sample(&text, "backup_metrics_textfile_write_failures_total"),
        Some(0)
    );
    promtool_check(&text);

    backup_plugin_cleanup();
    thread_gone();
    assert_eq!(
        names(dir.path()),
        vec!["backup_coordinator.prom"],
        "no temp file left"
    );
    assert_eq!(mode(&file), 0o640);
    // SAFETY: as above.
    unsafe { libc::umask(old_umask) };
}

#[test]
fn cleanup_wakes_the_thread_for_a_final_write_at_once() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup_coordinator.prom");
    // An interval no test waits for: only the first write and cleanup's can be seen.
    assert_eq!(init(&textfile_config(&file, "1h")), 0, "{}", last_error());
    wait_until("the first write", || {
        sample(&read(&file), "backup_errors_total") == Some(0)
    });
    backup_plugin_record_error(-5, std::ptr::null());
    backup_plugin_record_error(-6, std::ptr::null());
    let started = Instant::now();
    backup_plugin_cleanup();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "cleanup took {took:?}");
    let text = read(&file);
    assert_eq!(sample(&text, "backup_errors_total"), Some(2), "{text}");
    promtool_check(&text);
    thread_gone();
    assert_eq!(names(dir.path()), vec!["backup_coordinator.prom"]);

    // A new init starts a new thread, which rewrites the file from the new instance's zero.
    assert_eq!(init(&textfile_config(&file, "1h")), 0, "{}", last_error());
    // The thread names itself once it runs: a moment after init returns.
    wait_until("one backup-metrics thread runs", || metrics_threads() == 1);
    wait_until("the new instance's first write", || {
        sample(&read(&file), "backup_errors_total") == Some(0)
    });
    backup_plugin_cleanup();
    thread_gone();
}

#[test]
fn failed_rewrites_are_counted_and_logged_and_never_fatal() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup_coordinator.prom");
    let logs = dir.path().join("logs");
    let config = format!(
        "{}log_path = \"{}\"\nlog_level = \"warn\"\n",
        textfile_config(&file, "1s"),
        logs.display()
    );
    assert_eq!(init(&config), 0, "{}", last_error());
    wait_until("the first write", || file.exists());
    // A directory where the file goes: every rename onto it fails (EISDIR).
    fs::remove_file(&file).unwrap();
    fs::create_dir(&file).unwrap();
    wait_until("two failed rewrites are counted", || {
        sample(&metrics(), "backup_metrics_textfile_write_failures_total").is_some_and(|n| n >= 2)
    });
    assert_eq!(metrics_threads(), 1, "the thread goes on");
    fs::remove_dir(&file).unwrap();
    wait_until("a rewrite succeeds again and shows the failures", || {
        sample(&read(&file), "backup_metrics_textfile_write_failures_total").is_some_and(|n| n >= 2)
    });
    backup_plugin_cleanup();
    thread_gone();
    assert_eq!(names(dir.path()), vec!["backup_coordinator.prom", "logs"]);
    let log: String = names(&logs).iter().map(|n| read(&logs.join(n))).collect();
    let warnings = log
        .lines()
        .filter(|l| l.contains("metrics_textfile not rewritten"))
        .count();
    // One warning per streak of the same reason, not one per failed tick.
    assert_eq!(warnings, 1, "{log}");
    assert!(log.contains("Is a directory"), "{log}");
}

#[test]
fn a_full_disk_is_counted_every_tick_and_logged_once() {
    let _turn = turn();
    let mount = common::Mount::new(&["-t", "tmpfs", "-o", "size=64k", "tmpfs"]);
    let file = mount.path.join("backup_coordinator.prom");
    let logs = tempfile::tempdir().unwrap();
    let config = format!(
        "{}log_path = \"{}\"\nlog_level = \"warn\"\n",
        textfile_config(&file, "1s"),
        logs.path().display()
    );
    assert_eq!(init(&config), 0, "{}", last_error());
    wait_until("the first write", || file.exists());
    // Fill the file system: each rewrite's temp file then fails with ENOSPC, under another
    // name each time.
    let filler = mount.path.join("filler");
    let mut fill = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while fill.write_all(&chunk).is_ok() {}
    drop(fill);
    wait_until("three failed rewrites are counted", || {
        sample(&metrics(), "backup_metrics_textfile_write_failures_total").is_some_and(|n| n >= 3)
    });
    fs::remove_file(&filler).unwrap();
    wait_until("a rewrite succeeds again and shows the failures", || {
        sample(&read(&file), "backup_metrics_textfile_write_failures_total").is_some_and(|n| n >= 3)
    });
    backup_plugin_cleanup();
    thread_gone();
    assert_eq!(
        names(&mount.path),
        vec!["backup_coordinator.prom"],
        "no temp left"
    );
    let log: String = names(logs.path())
        .iter()
        .map(|n| read(&logs.path().join(n)))
        .collect();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("metrics_textfile not rewritten"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("No space left on device"), "{log}");
}

#[test]
fn without_the_key_no_thread_runs_and_no_file_is_written() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    // metrics_interval alone does nothing.
    let config = format!(
        "state_dir = \"{}\"\nmetrics_interval = \"1s\"\n",
        dir.path().join("state").display()
    );
    assert_eq!(init(&config), 0, "{}", last_error());
    backup_plugin_record_error(-5, std::ptr::null());
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(metrics_threads(), 0);
    assert!(!metrics().contains("backup_metrics_textfile"));
    backup_plugin_cleanup();
    assert_eq!(names(dir.path()), vec!["state"]);
    assert_eq!(names(&dir.path().join("state")), Vec::<String>::new());
}

#[test]
fn bad_values_fail_init_with_invalid_param_naming_the_key() {
    let _turn = turn();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.prom");
    let refused = |config: &str, named: &[&str]| {
        assert_eq!(init(config), INVALID_PARAM, "accepted:\n{config}");
        let why = last_error();
        for part in named {
            assert!(why.contains(part), "{config}\n=> {why}");
        }
        assert_eq!(metrics_threads(), 0, "no thread for a refused init");
        backup_plugin_cleanup();
    };
    for interval in ["\"0s\"", "\"500ms\"", "0", "\"999ms\"", "\"a while\""] {
        refused(
            &format!(
                "metrics_textfile = \"{}\"\nmetrics_interval = {interval}\n",
                file.display()
            ),
            &["key `metrics_interval`", interval],
        );
    }
    let missing = dir.path().join("no/such/dir/b.prom");
    refused(
        &textfile_config(&missing, "15s"),
        &["key `metrics_textfile`", "No such file or directory"],
    );
    assert!(
        !dir.path().join("no").exists(),
        "the directory is not created"
    );
    let plain = dir.path().join("plain");
    fs::write(&plain, b"").unwrap();
    refused(
        &textfile_config(&plain.join("b.prom"), "15s"),
        &["key `metrics_textfile`", "Not a directory"],
    );
    refused(
        &format!("metrics_textfile = \"{}/\"\n", dir.path().display()),
        &["key `metrics_textfile`"],
    );
    let ro = common::Mount::new(&["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"]);
    refused(
        &textfile_config(&ro.path.join("b.prom"), "15s"),
        &["key `metrics_textfile`", "Read-only file system"],
    );
    assert_eq!(names(dir.path()), vec!["plain"], "nothing written");
}
