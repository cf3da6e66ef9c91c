//! Group commit of the idempotency file store under SIGKILL: two processes with several
//! threads each share the store, so that each fsync covers the records of many callers,
//! and are killed in the middle of their batches. No record a caller was told about (an
//! operation that ran: its claim; a call that returned success: its completion) may be
//! missing afterwards. Child processes are this test binary run again with `GC_ROLE` set;
//! they go through the C ABI as taosX does.

#[path = "common/child.rs"]
mod child;

use backup_coordinator::clock::{Clock, SystemClock};
use backup_coordinator::ffi::idempotency::backup_execute_idempotent;
use backup_coordinator::ffi::plugin::{backup_plugin_get_last_error, backup_plugin_init};
use backup_coordinator::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
use backup_coordinator::idempotency::{fingerprint, Claim, IdempotencyStore};
use child::Child;
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

const THREADS: usize = 4;

/// One `write(2)` per event to one `O_APPEND` file shared by the children: a SIGKILL
/// cannot tear it, and events keep their order across processes.
fn note(event: String) {
    static EVENTS: OnceLock<fs::File> = OnceLock::new();
    let file = EVENTS.get_or_init(|| {
        let dir = PathBuf::from(std::env::var("GC_DIR").unwrap());
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("events"))
            .unwrap()
    });
    (&mut &*file).write_all(event.as_bytes()).unwrap();
}

/// The operation notes that it runs: its claim was acknowledged as durable.
unsafe extern "C" fn noted_op(user_data: *mut c_void) -> i32 {
    // SAFETY: the child passes a pointer to its key, alive for the whole call.
    let key = unsafe { CStr::from_ptr(user_data as *const _) };
    note(format!("run {}\n", key.to_str().unwrap()));
    0
}

/// The body of a child process; a no-op in the normal test run. THREADS threads run new
/// keys `<GC_TAG>-<thread>-<n>` until the process is killed.
#[test]
fn gc_child() {
    if std::env::var("GC_ROLE").is_err() {
        return;
    }
    let dir = PathBuf::from(std::env::var("GC_DIR").unwrap());
    let tag = std::env::var("GC_TAG").unwrap();
    let config = format!(
        "state_dir = \"{}\"\nerror_retry_max = 0\n",
        dir.join("state").display()
    );
    assert_eq!(
        backup_plugin_init(config.as_ptr() as *const _, config.len() as u32),
        0
    );
    println!("READY");
    std::io::stdout().flush().unwrap();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let tag = &tag;
            scope.spawn(move || {
                for n in 0u64.. {
                    let key = CString::new(format!("{tag}-{t}-{n}")).unwrap();
                    let rc = backup_execute_idempotent(
                        key.as_ptr(),
                        key.as_ptr() as *const c_void,
                        key.as_bytes().len(),
                        Some(noted_op),
                        key.as_ptr() as *mut c_void,
                        std::ptr::null_mut(),
                    );
                    if rc != 0 {
                        let why = unsafe { CStr::from_ptr(backup_plugin_get_last_error()) };
                        panic!("{key:?}: {rc} {why:?}");
                    }
                    note(format!("done {}\n", key.to_str().unwrap()));
                }
            });
        }
    });
}

/// A worker, killed (SIGKILL) and reaped when dropped, also when the test fails on the way.
fn spawn_child(dir: &Path, tag: &str) -> Child {
    let mut child = Child::command("gc_child")
        .env("GC_ROLE", "worker")
        .env("GC_DIR", dir)
        .env("GC_TAG", tag)
        .spawn();
    // The test harness prints its own lines first.
    let ready = child.lines().any(|line| line.ends_with("READY"));
    assert!(ready, "the child {tag} died before it was ready");
    child
}

#[test]
fn sigkill_in_the_middle_of_batches_loses_no_acknowledged_record() {
    const ROUNDS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    for round in 0..ROUNDS {
        let first = spawn_child(dir.path(), &format!("r{round}a"));
        let second = spawn_child(dir.path(), &format!("r{round}b"));
        // Both run a while, then die one after the other, mid-batch.
        std::thread::sleep(Duration::from_millis(rng.u64(30..120)));
        drop(first);
        std::thread::sleep(Duration::from_millis(rng.u64(0..20)));
        drop(second);
    }

    let mut runs: HashMap<String, u32> = HashMap::new();
    let mut done = Vec::new();
    for line in fs::read_to_string(dir.path().join("events"))
        .unwrap()
        .lines()
    {
        match line.split_once(' ') {
            Some(("run", key)) => *runs.entry(key.to_string()).or_default() += 1,
            Some(("done", key)) => done.push(key.to_string()),
            _ => panic!("a torn event: {line:?}"),
        }
    }
    let store = FileIdempotencyStore::open(
        &dir.path().join("state"),
        FileIdempotencySettings::new(Duration::from_secs(90), Duration::from_secs(86_400)),
    )
    .unwrap();
    let now = SystemClock.unix_ms();
    let claim = |key: &str| {
        store
            .claim(key.as_bytes(), &fingerprint(key.as_bytes()), now)
            .unwrap()
    };
    for key in &done {
        assert_eq!(runs.get(key), Some(&1), "{key} ran once before it returned");
        assert_eq!(
            claim(key),
            Claim::Replay { result: 0 },
            "{key}: completion lost"
        );
    }
    let mut claimed_only = 0;
    for (key, n) in &runs {
        assert_eq!(*n, 1, "{key} ran {n} times");
        if !done.contains(key) {
            // Its claim was durable before the operation ran; its completion may be too.
            match claim(key) {
                Claim::InProgress => claimed_only += 1,
                Claim::Replay { result: 0 } => {}
                other => panic!("{key}: ran, but its claim is lost: {other:?}"),
            }
        }
    }
    println!(
        "{ROUNDS} rounds of two processes × {THREADS} threads killed: {} completions \
         acknowledged, {} operations run, {claimed_only} killed between claim and completion",
        done.len(),
        runs.len()
    );
    assert!(done.len() >= 100, "too little done: {}", done.len());
    // Kills must have landed in the middle of calls, or this proved little (how many
    // landed before the completion was written is up to timing, and only reported).
    assert!(
        runs.len() - done.len() >= ROUNDS,
        "too few kills landed in the middle of a call: {}",
        runs.len() - done.len()
    );
}
