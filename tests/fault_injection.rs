//! Durability proven by breaking things: kill -9 in the middle of writes, a full tmpfs, a
//! read-only mount, kill -9 right after an error is recorded. Child processes are this test
//! binary run again with `FAULT_ROLE` set; they run only the `child_role` entry.

mod common;

use backup_coordinator::coordinator::{Coordinator, CoordinatorSettings};
use backup_coordinator::durable::write_atomic;
use backup_coordinator::error::ErrorCode;
use backup_coordinator::error_log::log_files;
use backup_coordinator::ffi::log_backup::{backup_log_run_command, SLogBackupRetryPolicy};
use backup_coordinator::ffi::plugin::{backup_plugin_init, backup_plugin_record_error};
use backup_coordinator::retry::{RetryPolicy, RetryProgress};
use common::child::{Child, Spawn};
use common::Mount;
use std::ffi::{c_void, CString};
use std::io::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};

const LOG_SUBCOMMAND_START: i32 = 0;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIG: usize = 1 << 20;
const SMALL: usize = 300_000;

fn role(role: &str, dir: &Path) -> Spawn {
    Child::command("child_role")
        .env("FAULT_ROLE", role)
        .env("FAULT_DIR", dir)
        .no_stderr()
}

fn spawn_role(role: &str, dir: &Path) -> Child {
    self::role(role, dir).spawn()
}

/// The body of a child process; a no-op in the normal test run.
#[test]
fn child_role() {
    let Ok(role) = std::env::var("FAULT_ROLE") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("FAULT_DIR").unwrap());
    match role.as_str() {
        "rewrite-forever" => {
            let target = dir.join("backup.dat");
            let (a, b) = (vec![b'a'; BIG], vec![b'b'; SMALL]);
            for i in 0u64.. {
                write_atomic(&target, if i % 2 == 0 { &a } else { &b }).unwrap();
            }
        }
        "record-then-die" => {
            let config = format!("error_store_path = \"{}\"\n", dir.display());
            assert_eq!(
                backup_plugin_init(config.as_ptr() as *const _, config.len() as u32),
                0
            );
            for i in 0..500 {
                let message = CString::new(format!("marker {i}")).unwrap();
                backup_plugin_record_error(-6, message.as_ptr());
            }
            // Killed right after the last record call returned: no exit handlers, no flush.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        "log-command" => {
            let config = format!("state_dir = \"{}\"\n", dir.join("state").display());
            assert_eq!(
                backup_plugin_init(config.as_ptr() as *const _, config.len() as u32),
                0
            );
            let policy = SLogBackupRetryPolicy {
                max_retry_times: 5,
                min_retry_duration_ms: 100,
                max_retry_duration_ms: 10_000,
                retry_timeout_ms: 600_000,
            };
            let task = CString::new("restart-task").unwrap();
            let rc = backup_log_run_command(
                task.as_ptr(),
                LOG_SUBCOMMAND_START,
                &policy,
                Some(query_not_exist),
                Some(execute_fails),
                std::ptr::null_mut(),
            );
            println!("RESULT {rc}");
        }
        other => panic!("unknown role {other}"),
    }
}

/// The task never exists yet.
unsafe extern "C" fn query_not_exist(_: *mut c_void, state: *mut i32, truncated: *mut bool) -> i32 {
    *state = 1; // LOG_BACKUP_KERNEL_NOT_EXIST
    *truncated = false;
    0
}

static ATTEMPTS_IN_THIS_PROCESS: AtomicU32 = AtomicU32::new(0);

/// Every attempt fails retryably and is noted in a file (append: survives kill -9). With
/// FAULT_KILL set, the third attempt arranges a SIGKILL in the middle of the wait after it.
unsafe extern "C" fn execute_fails(_: *mut c_void, _command: i32) -> i32 {
    let dir = PathBuf::from(std::env::var("FAULT_DIR").unwrap());
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("attempts"))
        .unwrap();
    log.write_all(b"attempt\n").unwrap();
    let n = ATTEMPTS_IN_THIS_PROCESS.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 3 && std::env::var("FAULT_KILL").is_ok() {
        // The third wait is 400 ms: die 150 ms into it.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(150));
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        });
    }
    -6 // BACKUP_ERROR_NETWORK
}

#[test]
fn a_restart_continues_the_retry_count() {
    let dir = tempfile::tempdir().unwrap();
    let first = role("log-command", dir.path())
        .env("FAULT_KILL", "1")
        .output();
    assert!(
        !first.status.success(),
        "the first process was meant to die by SIGKILL"
    );
    let attempts = || {
        fs::read_to_string(dir.path().join("attempts"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(attempts(), 3);

    let (_, stdout) = spawn_role("log-command", dir.path()).wait_with_output();
    assert!(stdout.contains("RESULT -12"), "second process: {stdout}");
    assert_eq!(
        attempts(),
        6,
        "5 retries across both processes, not 5 per process"
    );
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn kill_9_during_rewrites_never_tears_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("backup.dat");
    let mut rng = fastrand::Rng::with_seed(42);
    let mut kills_mid_write = 0;
    for _ in 0..25 {
        let mut child = spawn_role("rewrite-forever", dir.path());
        std::thread::sleep(Duration::from_millis(rng.u64(5..80)));
        child.kill(); // SIGKILL
        if let Ok(content) = fs::read(&target) {
            let whole_a = content.len() == BIG && content.iter().all(|&c| c == b'a');
            let whole_b = content.len() == SMALL && content.iter().all(|&c| c == b'b');
            // A child killed before its first rename leaves the previous round's content.
            let untouched = content == b"checkpoint";
            assert!(
                whole_a || whole_b || untouched,
                "torn file: {} bytes",
                content.len()
            );
        }
        kills_mid_write += usize::from(entries(dir.path()).len() > 1);
        // The next write (another process) sweeps the dead writer's temp file.
        write_atomic(&target, b"checkpoint").unwrap();
        assert_eq!(entries(dir.path()), vec!["backup.dat"]);
        assert_eq!(fs::read(&target).unwrap(), b"checkpoint");
    }
    // The child spends nearly all its time writing: some kills must have hit a write in
    // flight, or this test proved nothing.
    assert!(
        kills_mid_write > 0,
        "no kill landed in the middle of a write"
    );
}

#[test]
fn a_line_recorded_before_kill_9_is_in_the_log() {
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_role("record-then-die", dir.path());
        let status = child.wait();
        assert!(!status.success(), "the child was meant to die by SIGKILL");
        let mut text = String::new();
        for (_, path) in log_files(dir.path()).unwrap() {
            text.push_str(&fs::read_to_string(path).unwrap());
        }
        for i in 0..500 {
            assert!(
                text.contains(&format!("] Error -6: marker {i}\n")),
                "line {i} lost"
            );
        }
        assert_eq!(text.lines().count(), 500);
    }
}

fn coordinator() -> Coordinator {
    Coordinator::new(
        CoordinatorSettings {
            error_buffer_size: 10,
            ..Default::default()
        },
        0,
        0,
    )
}

#[test]
fn a_full_disk_is_reported_not_retried_and_leaves_the_old_content() {
    let mount = Mount::new(&["-t", "tmpfs", "-o", "size=256k", "tmpfs"]);
    let target = mount.path.join("set.dat");
    write_atomic(&target, b"old content").unwrap();
    let c = coordinator();
    let mut progress = RetryProgress::default();
    let policy = RetryPolicy::fixed(5, Duration::ZERO);
    let execution = c.write_file(&policy, &mut progress, &target, &vec![7u8; BIG]);
    assert_eq!(execution.code(), ErrorCode::DiskFull.raw());
    assert_eq!(
        execution.retries, 0,
        "a full disk must not be retried blindly"
    );
    assert_eq!(c.tracker().stats(), (0, 0), "no retry counted");
    assert!(execution.result.unwrap_err().detail().contains("Disk full"));
    assert_eq!(fs::read(&target).unwrap(), b"old content");
    assert_eq!(
        entries(&mount.path),
        vec!["set.dat"],
        "no partial temp file"
    );

    // A new file on a full disk: not created at all.
    let fresh = mount.path.join("fresh.dat");
    let execution = c.write_file(&policy, &mut progress, &fresh, &vec![7u8; BIG]);
    assert_eq!(execution.code(), ErrorCode::DiskFull.raw());
    assert!(!fresh.exists());
}

#[test]
fn a_read_only_mount_is_permission_denied_and_not_retried() {
    let source = tempfile::tempdir().unwrap();
    fs::write(source.path().join("set.dat"), b"old").unwrap();
    let mount = Mount::new(&["--bind", "-o", "ro", source.path().to_str().unwrap()]);
    // Some kernels ignore ro on the first bind: remount to be sure.
    let _ = Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&mount.path)
        .status();
    let c = coordinator();
    let mut progress = RetryProgress::default();
    let execution = c.write_file(
        &RetryPolicy::fixed(5, Duration::ZERO),
        &mut progress,
        &mount.path.join("set.dat"),
        b"new",
    );
    assert_eq!(execution.code(), ErrorCode::PermissionDenied.raw());
    assert_eq!(execution.retries, 0);
    assert_eq!(fs::read(mount.path.join("set.dat")).unwrap(), b"old");
}
