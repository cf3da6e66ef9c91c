//! The config of C_API §5 as a host meets it: through `backup_plugin_init` and
//! `backup_plugin_get_last_error`. taosX's own section, the coordinator keys, the log and etcd
//! keys, typos in the plugin section, syntax errors, values echoed as written, NULs, secrets,
//! and the directories init checks.
mod common;

use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_last_error, backup_plugin_init,
};
use std::ffi::CStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

const SUCCESS: i32 = 0;
const INVALID_PARAM: i32 = -1;

/// One plugin per process, and the umask is process-wide: these tests take turns.
static TURN: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    let guard = TURN.lock().unwrap_or_else(|e| e.into_inner());
    backup_plugin_cleanup();
    guard
}

fn init_bytes(config: &[u8]) -> i32 {
    backup_plugin_init(config.as_ptr() as *const _, config.len() as u32)
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(backup_plugin_get_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Init must succeed; the plugin is cleaned up again.
fn accepts(config: &str) {
    let rc = init_bytes(config.as_bytes());
    let why = last_error();
    backup_plugin_cleanup();
    assert_eq!(rc, SUCCESS, "refused:\n{config}\n=> {why}");
}

/// Init must fail with INVALID_PARAM; returns the last error.
fn refuses(config: &str) -> String {
    let rc = init_bytes(config.as_bytes());
    let why = last_error();
    backup_plugin_cleanup();
    assert_eq!(rc, INVALID_PARAM, "accepted:\n{config}\n=> {why}");
    why
}

/// The section taosX's spec shows, verbatim. It names a system directory, which init
/// creates when missing (as root); the test removes what it created.
const SPEC_SECTION: &str = r#"[plugins.incremental_bitmap]
enable = true
error_retry_max = 10
error_retry_interval = 5
error_store_path = "/var/log/taosx/backup_errors"
enable_error_logging = true
error_buffer_size = 1000
"#;

#[test]
fn the_taosx_spec_section_inits_as_it_is() {
    let _turn = turn();
    let parent = Path::new("/var/log/taosx");
    let existed = parent.exists();
    let dir_existed = parent.join("backup_errors").exists();
    accepts(SPEC_SECTION);
    assert!(parent.join("backup_errors").is_dir());
    if !dir_existed {
        let _ = fs::remove_dir(parent.join("backup_errors"));
    }
    if !existed {
        let _ = fs::remove_dir(parent);
    }
}

#[test]
fn every_coordinator_key_is_accepted_and_a_bad_value_of_each_refused() {
    let _turn = turn();
    accepts(
        "[plugins.incremental_bitmap]\nmax_blocks_per_batch = 1000\nbatch_timeout_ms = 5000\n\
         enable_compression = true\nenable_encryption = true\nencryption_key = \"0123456789abcdef\"\n\
         backup_path = \"/data/taosx/backup\"\nbackup_max_size = \"10GB\"\ncompression_level = 6\n",
    );
    accepts("backup_max_size = 1073741824\ncompression_level = 0");
    for (key, bad) in [
        ("max_blocks_per_batch", "-1"),
        ("max_blocks_per_batch", "4294967296"),
        ("batch_timeout_ms", "\"fast\""),
        ("enable_compression", "\"yes\""),
        ("enable_encryption", "1"),
        ("backup_path", "\"\""),
        ("backup_max_size", "\"12 parsecs\""),
        ("backup_max_size", "-5"),
        ("compression_level", "10"),
        ("compression_level", "1.5"),
    ] {
        let why = refuses(&format!("[plugins.incremental_bitmap]\n{key} = {bad}\n"));
        assert!(
            why.contains(&format!("`{key}`")) && why.contains(bad),
            "{key} = {bad}: {why}"
        );
    }
}

#[test]
fn every_other_key_of_section_5_is_accepted() {
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display();
    accepts(&format!(
        "enable = false\nerror_retry_max = 3\nerror_retry_interval = \"250ms\"\n\
         error_retry_max_interval = \"5m\"\nerror_retry_multiplier = 2.0\nerror_retry_jitter = true\n\
         error_retry_timeout = \"30m\"\nerror_store_path = \"{d}/errors\"\nenable_error_logging = true\n\
         error_buffer_size = 1000\nerror_log_rotation_size = \"64MB\"\nerror_log_rotation_count = 30\n\
         state_dir = \"{d}/state\"\nidempotency_ttl = \"24h\"\nidempotency_lease = \"90s\"\n\
         log_path = \"{d}/logs\"\nlog_level = \"debug\"\nstate_backend = \"file\"\n\
         etcd_endpoints = [\"http://127.0.0.1:2379\"]\netcd_prefix = \"/taosx/backup/\"\n\
         etcd_timeout = \"5s\"\netcd_user = \"root\"\netcd_password = \"pw\"\n"
    ));
    accepts(&format!(
        "log.path = \"{d}/logs2\"\nlog.level = \"backup_coordinator=trace,warn\"\n\
         etcd.endpoints = [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\n\
         etcd.prefix = \"/x/\"\netcd.timeout = 2\nerror.retry.max = 1\nerror.retry.interval = 1\n"
    ));
    // The etcd backend: endpoints required; TLS files must be readable at init.
    let why = refuses("state_backend = \"etcd\"");
    assert!(why.contains("etcd_endpoints"), "{why}");
    fs::write(tmp.path().join("ca.pem"), b"ca").unwrap();
    accepts(&format!(
        "state_backend = \"etcd\"\netcd_endpoints = \"https://127.0.0.1:2379\"\netcd_ca_file = \"{d}/ca.pem\"\n"
    ));
    let why = refuses(&format!(
        "state_backend = \"etcd\"\netcd_endpoints = \"https://127.0.0.1:2379\"\netcd_ca_file = \"{d}/missing.pem\"\n"
    ));
    assert!(
        why.contains("etcd_ca_file") && why.contains("No such file"),
        "{why}"
    );
    for (text, named) in [
        ("state_backend = \"zookeeper\"", "\"zookeeper\""),
        ("etcd_endpoints = [\"localhost\"]", "\"localhost\""),
        ("etcd.endpoints = [\"ftp://h:1\"]", "etcd.endpoints"),
        ("etcd_timeout = \"soon\"", "\"soon\""),
        ("log_level = \"loud\"", "\"loud\""),
        ("log.level = 3", "log.level"),
        ("log_path = false", "log_path"),
        ("enable = \"on\"", "enable"),
    ] {
        let why = refuses(text);
        assert!(why.contains(named), "{text}: {why}");
    }
}

#[test]
fn mistyped_plugin_sections_are_refused_naming_them() {
    let _turn = turn();
    let why = refuses("[plugins]\nerror_retry_max = 3\n");
    assert!(why.contains("plugins.error_retry_max"), "{why}");
    let why = refuses("[[plugins.incremental_bitmap]]\nerror_retry_max = 3\n");
    assert!(why.contains("[[plugins.incremental_bitmap]]"), "{why}");
    let why = refuses("plugins.incremental_bitmap = \"oops\"\n");
    assert!(
        why.contains("plugins.incremental_bitmap") && why.contains("\"oops\""),
        "{why}"
    );
    // Other plugins' tables stay theirs.
    accepts("[plugins.other]\nanything = [1, 2]\n[plugins.incremental_bitmap]\nenable = true\n");
}

#[test]
fn syntax_errors_name_their_line_and_column() {
    let _turn = turn();
    let why = refuses("[plugins.incremental_bitmap]\nenable = true\nerror_retry_max = = 3\n");
    assert!(why.contains("line 3, column 19"), "{why}");
    let why = refuses("[plugins.incremental_bitmap\nenable = true\n");
    assert!(why.contains("line 1, column"), "{why}");
}

#[test]
fn values_are_echoed_as_written_and_secrets_never() {
    let _turn = turn();
    let why = refuses("error_buffer_size = 1e308");
    assert!(why.contains("got 1e308"), "{why}");
    assert!(!why.contains("0000000000"), "{why}");
    let why = refuses("error_retry_max = 0xFFFFFFFFFF");
    assert!(why.contains("0xFFFFFFFFFF"), "{why}");
    for text in [
        "encryption_key = 4242424242",
        "encryption_key = \"\"",
        "etcd_password = [\"4242424242\"]",
        "etcd_password = 4242424242",
    ] {
        let why = refuses(text);
        assert!(
            why.contains(text.split(" = ").next().unwrap()) && !why.contains("4242"),
            "{text}: {why}"
        );
    }
}

#[test]
fn trailing_nuls_inside_the_length_are_ignored_and_other_nuls_refused() {
    let _turn = turn();
    let section = b"[plugins.incremental_bitmap]\nerror_retry_max = 3\n\0";
    assert_eq!(init_bytes(section), SUCCESS, "{}", last_error());
    backup_plugin_cleanup();
    assert_eq!(init_bytes(b"error_retry_max = 3\0\0\0"), SUCCESS);
    backup_plugin_cleanup();
    assert_eq!(
        init_bytes(b"error_retry_max = 3\0error_retry_interval = 1"),
        INVALID_PARAM
    );
    let why = last_error();
    assert!(why.contains("NUL"), "{why}");
    backup_plugin_cleanup();
}

#[test]
fn init_creates_missing_directories_0750_whatever_the_umask() {
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let config = format!(
        "error_store_path = \"{0}/e/rr\"\nstate_dir = \"{0}/s\"\nlog_path = \"{0}/l/o/g\"\n",
        d.display()
    );
    // SAFETY: umask only sets the process's mask; every test here holds TURN.
    let old = unsafe { libc::umask(0o077) };
    let rc = init_bytes(config.as_bytes());
    unsafe { libc::umask(old) };
    let why = last_error();
    backup_plugin_cleanup();
    assert_eq!(rc, SUCCESS, "{why}");
    for dir in ["e", "e/rr", "s", "l", "l/o", "l/o/g"] {
        let mode = fs::metadata(d.join(dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750, "{dir}");
    }
}

#[test]
fn unusable_directories_fail_init_naming_the_key_and_the_reason() {
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain");
    fs::write(&file, b"x").unwrap();
    for key in ["error_store_path", "state_dir", "log_path"] {
        let why = refuses(&format!("{key} = \"{}\"", file.display()));
        assert!(
            why.contains(&format!("`{key}`")) && why.contains("Not a directory"),
            "{why}"
        );
        let why = refuses(&format!("{key} = \"{}/below\"", file.display()));
        assert!(why.contains("Not a directory"), "{why}");
    }
    let ro = common::Mount::new(&["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"]);
    let why = refuses(&format!("state_dir = \"{}\"", ro.path.display()));
    assert!(
        why.contains("`state_dir`") && why.contains("Read-only file system"),
        "{why}"
    );
    let why = refuses(&format!("log.path = \"{}/new\"", ro.path.display()));
    assert!(
        why.contains("log_path") && why.contains("Read-only file system"),
        "{why}"
    );
    // Logging switched off: its directory is not needed, so not checked.
    accepts(&format!(
        "error_store_path = \"{}\"\nenable_error_logging = false",
        file.display()
    ));
}
