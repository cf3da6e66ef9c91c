//! The diagnostics log of C_API §10, through the C entry points: the file, its name, modes and
//! lines; the level; nothing without `log_path`; no secret in any file the plugin wrote.
use backup_coordinator::diagnostics::{file_for, utc_date_now};
use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_execute_with_retry, backup_plugin_init,
    backup_plugin_record_error,
};
use std::ffi::{c_void, CString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The plugin is one per process: these tests take turns.
static PLUGIN: Mutex<()> = Mutex::new(());

const KEY: &str = "Pl41n-S3cret-Key-0123456789abcdef";

fn init(config: &str) -> i32 {
    backup_plugin_init(config.as_ptr() as *const _, config.len() as u32)
}

extern "C" fn fail_twice(user_data: *mut c_void) -> i32 {
    // SAFETY: the tests pass an AtomicU32.
    let calls = unsafe { &*(user_data as *const AtomicU32) };
    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
        -6 // BACKUP_ERROR_NETWORK: retried
    } else {
        0
    }
}

fn run_op_failing_twice() -> i32 {
    let calls = AtomicU32::new(0);
    backup_plugin_execute_with_retry(Some(fail_twice), &calls as *const _ as *mut c_void)
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn events_reach_a_daily_file_with_their_fields_and_no_secret() {
    let _turn = PLUGIN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("var/log/plugin");
    let errors = tmp.path().join("errors");
    let config = format!(
        "[plugins.incremental_bitmap]\nerror_retry_max = 3\nerror_retry_interval = \"1ms\"\n\
         error_store_path = \"{}\"\nlog.path = \"{}\"\nlog.level = \"debug\"\n\
         encryption_key = \"{KEY}\"\nstate_dir = \"{}\"\n",
        errors.display(),
        logs.display(),
        tmp.path().join("state").display()
    );
    assert_eq!(init(&config), 0);
    assert_eq!(run_op_failing_twice(), 0);
    // An error that cannot reach its log (a file where its directory was), whose message
    // carries the key.
    fs::remove_dir_all(&errors).unwrap();
    fs::write(&errors, b"not a directory any more").unwrap();
    let message = CString::new(format!("upload refused for key {KEY}")).unwrap();
    backup_plugin_record_error(-6, message.as_ptr());
    // A thread of the host's that the plugin never saw before: its events arrive too.
    std::thread::spawn(|| assert_eq!(run_op_failing_twice(), 0))
        .join()
        .unwrap();
    backup_plugin_cleanup();

    let file = file_for(&logs, &utc_date_now());
    assert!(file.exists(), "no {}", file.display());
    assert_eq!(mode(&logs), 0o750);
    assert_eq!(mode(&file), 0o640);
    let text = fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let with = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(with("plugin initialized"), 1, "{text}");
    assert_eq!(with("operation failed, retrying"), 4, "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("retrying") && l.contains("retry=1") && l.contains("code=-6")),
        "a retry line carries its fields: {text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("could not write the error log")
                && l.contains(&errors.display().to_string())),
        "a failed error-log write names its path: {text}"
    );
    assert_eq!(
        with("plugin cleaned up"),
        1,
        "cleanup flushed its own line: {text}"
    );
    // Every file the plugin wrote (diagnostics, state), and the config key nowhere.
    let mut written = files_under(&logs);
    written.extend(files_under(&tmp.path().join("state")));
    for path in written {
        let bytes = fs::read(&path).unwrap();
        assert!(
            !bytes
                .windows(8)
                .any(|w| KEY.as_bytes().windows(8).any(|k| k == w)),
            "{} holds a piece of encryption_key",
            path.display()
        );
    }
}

#[test]
fn the_level_filters_and_without_log_path_no_file_is_written() {
    let _turn = PLUGIN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let config = format!(
        "error_retry_max = 1\nerror_retry_interval = 0\nlog_path = \"{}\"\nlog_level = \"warn\"\n",
        logs.display()
    );
    assert_eq!(init(&config), 0);
    let calls = AtomicU32::new(0);
    // Two failures against one retry: a warning (give-up); the retry itself is info.
    assert_eq!(
        backup_plugin_execute_with_retry(Some(fail_twice), &calls as *const _ as *mut c_void),
        -12
    );
    backup_plugin_cleanup();
    let file = file_for(&logs, &utc_date_now());
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.contains("retry attempts exhausted"), "{text}");
    assert!(text.contains("WARN"), "{text}");
    assert!(
        !text.contains("INFO") && !text.contains("retrying"),
        "info lines at level warn: {text}"
    );

    // Init again without log_path: the earlier file gets nothing more.
    let before = fs::read(&file).unwrap();
    assert_eq!(init("error_retry_max = 3\nerror_retry_interval = 0"), 0);
    assert_eq!(run_op_failing_twice(), 0);
    backup_plugin_cleanup();
    assert_eq!(fs::read(&file).unwrap(), before);
    assert_eq!(fs::read_dir(&logs).unwrap().count(), 1);
}

#[test]
fn a_log_path_that_is_not_a_directory_fails_init_naming_it() {
    let _turn = PLUGIN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain");
    fs::write(&file, b"x").unwrap();
    assert_eq!(init(&format!("log_path = \"{}\"", file.display())), -1);
    let last = unsafe {
        std::ffi::CStr::from_ptr(backup_coordinator::ffi::plugin::backup_plugin_get_last_error())
    }
    .to_string_lossy()
    .into_owned();
    assert!(
        last.contains("log_path") && last.contains("Not a directory"),
        "{last}"
    );
    backup_plugin_cleanup();
}

#[test]
fn encryption_key_is_in_no_file_the_plugin_wrote() {
    let _turn = PLUGIN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "[plugins.incremental_bitmap]\nerror_retry_max = 2\nerror_retry_interval = 0\n\
         error_store_path = \"{0}/errors\"\nstate_dir = \"{0}/state\"\nlog_path = \"{0}/logs\"\n\
         log_level = \"trace\"\nenable_encryption = true\nencryption_key = \"{KEY}\"\n",
        tmp.path().display()
    );
    assert_eq!(init(&config), 0);
    for message in [
        format!("upload refused for key {KEY}"),
        format!("{KEY}{KEY}"),
        format!("prefix {KEY} suffix"),
    ] {
        let message = CString::new(message).unwrap();
        backup_plugin_record_error(-6, message.as_ptr());
    }
    assert_eq!(run_op_failing_twice(), 0);
    let last = unsafe {
        std::ffi::CStr::from_ptr(backup_coordinator::ffi::plugin::backup_plugin_get_last_error())
    }
    .to_string_lossy()
    .into_owned();
    backup_plugin_cleanup();
    assert!(!last.contains(&KEY[..8]), "{last}");
    let files = files_under(tmp.path());
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("backup_error_")),
        "the error log was written: {files:?}"
    );
    assert!(files
        .iter()
        .any(|f| f.to_string_lossy().contains("backup_plugin.log.")));
    for path in files {
        let bytes = fs::read(&path).unwrap();
        assert!(
            !bytes
                .windows(8)
                .any(|w| KEY.as_bytes().windows(8).any(|k| k == w)),
            "{} holds a piece of encryption_key:\n{}",
            path.display(),
            String::from_utf8_lossy(&bytes)
        );
    }
}
