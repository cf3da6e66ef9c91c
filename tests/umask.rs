//! Directories the plugin creates are 0750 whatever the process's umask (C_API §5, §6):
//! the error-log directory and the state directories. Alone in its binary, because the
//! umask is process-wide.

use backup_coordinator::ffi::idempotency::backup_execute_idempotent;
use backup_coordinator::ffi::log_backup::backup_log_run_command;
use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_last_error, backup_plugin_init,
    backup_plugin_record_error,
};
use std::ffi::{c_void, CStr, CString};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

unsafe extern "C" fn succeed(_: *mut c_void) -> i32 {
    0
}

unsafe extern "C" fn query_running(_: *mut c_void, state: *mut i32, truncated: *mut bool) -> i32 {
    // SAFETY: the plugin passes valid out-pointers.
    unsafe {
        *state = 2; // RUNNING
        *truncated = false;
    }
    0
}

unsafe extern "C" fn execute_nothing(_: *mut c_void, _: i32) -> i32 {
    0
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn directories_are_0750_under_umask_077() {
    // SAFETY: umask(2) only sets the process's mask.
    unsafe { libc::umask(0o077) };
    let root = tempfile::tempdir().unwrap();
    let errors = root.path().join("errors/nested");
    let state = root.path().join("state/nested");
    let config = format!(
        "error_store_path = \"{}\"\nstate_dir = \"{}\"\n",
        errors.display(),
        state.display()
    );
    let rc = backup_plugin_init(config.as_ptr() as *const _, config.len() as u32);
    // SAFETY: a NUL-terminated string from the plugin.
    let why = unsafe { CStr::from_ptr(backup_plugin_get_last_error()) };
    assert_eq!(rc, 0, "{why:?}");
    backup_plugin_record_error(-5, std::ptr::null());
    let key = CString::new("k").unwrap();
    let rc = backup_execute_idempotent(
        key.as_ptr(),
        std::ptr::null(),
        0,
        Some(succeed),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    assert_eq!(rc, 0);
    // A STOP on a running task makes a retry-record directory only if it fails; a run
    // command creates its lock there either way.
    let task = CString::new("task").unwrap();
    let rc = backup_log_run_command(
        task.as_ptr(),
        1,
        std::ptr::null(),
        Some(query_running),
        Some(execute_nothing),
        std::ptr::null_mut(),
    );
    assert_eq!(rc, 0);
    backup_plugin_cleanup();
    for dir in [
        root.path().join("errors"),
        errors.clone(),
        root.path().join("state"),
        state.clone(),
        state.join("idempotency"),
        state.join("log_backup"),
    ] {
        assert_eq!(mode(&dir), 0o750, "{}", dir.display());
    }
    let log = std::fs::read_dir(&errors).unwrap().next().unwrap().unwrap();
    assert_eq!(mode(&log.path()), 0o640, "{}", log.path().display());
}
