//! Idempotency keys proven by breaking things: processes racing over the same keys,
//! SIGKILL at random instants while claiming and completing, a full disk, a read-only
//! state dir. Child processes are this test binary run again with `IDEM_ROLE` set; they
//! go through the C ABI as taosX does.

mod common;

use backup_coordinator::clock::SystemClock;
use backup_coordinator::error::ErrorCode;
use backup_coordinator::ffi::idempotency::backup_execute_idempotent;
use backup_coordinator::ffi::plugin::{backup_plugin_get_last_error, backup_plugin_init};
use backup_coordinator::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
use backup_coordinator::idempotency::keyed::Keyed;
use backup_coordinator::idempotency::{
    fingerprint, Claim, ClaimToken, Completion, IdempotencyStore,
};
use backup_coordinator::retry::Execution;
use common::child::Child;
use common::Mount;
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const IN_PROGRESS: i32 = ErrorCode::InProgress as i32;

fn spawn_worker(dir: &Path, envs: &[(&str, String)]) -> Child {
    Child::command("idem_child")
        .env("IDEM_ROLE", "worker")
        .env("IDEM_DIR", dir)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .spawn()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().unwrap())
}

/// Where the children note what happened, in one append-only file so that the order of
/// events across processes is kept: `run <key> <pid>` from inside the operation, and
/// `done <key> <pid> <replayed>` once the call returned success.
fn events_file() -> &'static fs::File {
    static EVENTS: OnceLock<fs::File> = OnceLock::new();
    EVENTS.get_or_init(|| {
        let dir = PathBuf::from(std::env::var("IDEM_DIR").unwrap());
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("events"))
            .unwrap()
    })
}

/// One `write(2)` per event: a SIGKILL cannot tear it.
fn note(event: String) {
    (&mut events_file()).write_all(event.as_bytes()).unwrap();
}

unsafe extern "C" fn noted_op(user_data: *mut c_void) -> i32 {
    note(format!(
        "run {} {}\n",
        user_data as usize,
        std::process::id()
    ));
    0
}

/// The body of a child process; a no-op in the normal test run.
///
/// IDEM_KEYS keys from IDEM_START; IDEM_MODE `all`: every key to success, waiting out
/// IN_PROGRESS; `skip`: keys another caller holds are skipped.
#[test]
fn idem_child() {
    if std::env::var("IDEM_ROLE").is_err() {
        return;
    }
    let dir = PathBuf::from(std::env::var("IDEM_DIR").unwrap());
    let lease = std::env::var("IDEM_LEASE").unwrap_or_else(|_| "90s".into());
    let config = format!(
        "state_dir = \"{}\"\nidempotency_lease = \"{lease}\"\nerror_retry_max = 0\n\
         idempotency_compaction_slack = \"16KB\"\n",
        dir.join("state").display()
    );
    assert_eq!(
        backup_plugin_init(config.as_ptr() as *const _, config.len() as u32),
        0
    );
    println!("READY");
    std::io::stdout().flush().unwrap();
    let start = env_u64("IDEM_START", 0);
    let keys = env_u64("IDEM_KEYS", 100);
    let wait = std::env::var("IDEM_MODE").as_deref() == Ok("all");
    for k in start..start + keys {
        let key = CString::new(format!("key-{k}")).unwrap();
        let payload = format!("payload-{k}");
        loop {
            let mut replayed = false;
            let rc = backup_execute_idempotent(
                key.as_ptr(),
                payload.as_ptr() as *const c_void,
                payload.len(),
                Some(noted_op),
                k as usize as *mut c_void,
                &mut replayed,
            );
            match rc {
                0 => note(format!(
                    "done {k} {} {}\n",
                    std::process::id(),
                    replayed as u8
                )),
                IN_PROGRESS if wait => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                IN_PROGRESS => {}
                other => {
                    let why = unsafe { CStr::from_ptr(backup_plugin_get_last_error()) };
                    panic!("key-{k}: {other} {why:?}");
                }
            }
            break;
        }
    }
}

#[derive(Debug, PartialEq)]
enum Event {
    Run { pid: u32 },
    Done { pid: u32, replayed: bool },
}

/// Each key's events, in the order they happened.
fn events(dir: &Path) -> HashMap<u64, Vec<Event>> {
    let mut by_key: HashMap<u64, Vec<Event>> = HashMap::new();
    let text = fs::read_to_string(dir.join("events")).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let event = match f[0] {
            "run" => Event::Run {
                pid: f[2].parse().unwrap(),
            },
            "done" => Event::Done {
                pid: f[2].parse().unwrap(),
                replayed: f[3] == "1",
            },
            other => panic!("bad event line {other:?}"),
        };
        by_key.entry(f[1].parse().unwrap()).or_default().push(event);
    }
    by_key
}

struct Tally {
    runs: usize,
    /// Calls that ran the operation and returned success.
    ran_now: usize,
    replays: usize,
}

fn tally(events: &[Event]) -> Tally {
    let count = |f: fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    Tally {
        runs: count(|e| matches!(e, Event::Run { .. })),
        ran_now: count(|e| {
            matches!(
                e,
                Event::Done {
                    replayed: false,
                    ..
                }
            )
        }),
        replays: count(|e| matches!(e, Event::Done { replayed: true, .. })),
    }
}

#[test]
fn four_processes_on_the_same_keys_run_each_operation_once() {
    const KEYS: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<Child> = (0..4)
        .map(|_| {
            spawn_worker(
                dir.path(),
                &[("IDEM_KEYS", KEYS.to_string()), ("IDEM_MODE", "all".into())],
            )
        })
        .collect();
    for child in children {
        let (status, _) = child.wait_with_output();
        assert!(status.success(), "a worker failed");
    }
    let events = events(dir.path());
    for k in 0..KEYS {
        let e = &events[&k];
        let Tally {
            runs,
            ran_now,
            replays,
        } = tally(e);

        assert_eq!((runs, ran_now, replays), (1, 1, 3), "key-{k}: {e:?}");
    }
}

#[test]
fn sigkill_while_claiming_and_completing_never_runs_a_completed_key_again() {
    const ROUNDS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut start = 0u64;
    for _ in 0..ROUNDS {
        let mut child = spawn_worker(
            dir.path(),
            &[
                ("IDEM_START", start.to_string()),
                ("IDEM_KEYS", "1000000".into()),
                ("IDEM_MODE", "skip".into()),
                ("IDEM_LEASE", "1s".into()),
            ],
        );
        // The test harness prints its own lines first.
        let ready = child.lines().any(|line| line.ends_with("READY"));
        assert!(ready, "the worker died before it was ready");
        std::thread::sleep(Duration::from_micros(rng.u64(500..15_000)));
        child.kill(); // SIGKILL
                      // The next process starts a little before where this one got to.
        let last_done = events(dir.path())
            .iter()
            .filter(|(_, e)| e.iter().any(|e| matches!(e, Event::Done { .. })))
            .map(|(k, _)| *k)
            .max();
        start = last_done.map_or(0, |k| k.saturating_sub(2));
    }
    let attempted = events(dir.path()).keys().max().map_or(0, |k| k + 1);
    assert!(
        attempted > 50,
        "the children got too little done: {attempted} keys"
    );

    // Once the dead owners' leases ran out, one process finishes every key.
    std::thread::sleep(Duration::from_millis(1100));
    let finisher = spawn_worker(
        dir.path(),
        &[
            ("IDEM_KEYS", attempted.to_string()),
            ("IDEM_MODE", "all".into()),
            ("IDEM_LEASE", "1s".into()),
        ],
    );
    let finisher_pid = finisher.id();
    assert!(finisher.wait_with_output().0.success());

    let events = events(dir.path());
    let (mut taken_over, mut stranded, mut completed_unacknowledged) = (0, 0, 0);
    for k in 0..attempted {
        let e = &events[&k];
        let first_done = e.iter().position(|e| matches!(e, Event::Done { .. }));
        let first_done = first_done.unwrap_or_else(|| panic!("key-{k} never finished: {e:?}"));
        assert!(
            !e[first_done..]
                .iter()
                .any(|e| matches!(e, Event::Run { .. })),
            "key-{k} ran again after it completed: {e:?}"
        );
        let ran_now = tally(e).ran_now;
        assert!(ran_now <= 1, "key-{k} completed twice: {e:?}");
        let mut run_pids: Vec<u32> = e
            .iter()
            .filter_map(|e| match e {
                Event::Run { pid } => Some(*pid),
                _ => None,
            })
            .collect();
        let runs = run_pids.len();
        run_pids.dedup();
        assert_eq!(
            run_pids.len(),
            runs,
            "key-{k} ran twice in one process: {e:?}"
        );
        taken_over += usize::from(runs > 1);
        // Claimed by a process killed before its completion: the finisher ran it.
        stranded += usize::from(e.contains(&Event::Done {
            pid: finisher_pid,
            replayed: false,
        }));
        // Completed durably by a process killed before it could say so: replayed, not lost.
        completed_unacknowledged += usize::from(
            ran_now == 0
                && e[first_done]
                    == Event::Done {
                        pid: finisher_pid,
                        replayed: true,
                    },
        );
    }
    println!(
        "{ROUNDS} kills over {attempted} keys: {stranded} claims of killed owners taken over \
         ({taken_over} of them after the operation had run), {completed_unacknowledged} \
         completions recorded just before the kill replayed"
    );
    // Kills must have landed between a claim and its completion, or this proved little.
    assert!(
        stranded >= 10,
        "too few kills landed while a key was claimed"
    );
}

fn counted_op(runs: &std::sync::atomic::AtomicU32) -> impl FnOnce() -> Execution + '_ {
    move || {
        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Execution {
            result: Ok(()),
            retries: 0,
            last_failure: None,
        }
    }
}

/// Fills the file system of `dir` to the last byte; the filler file is returned.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        if let Err(e) = file.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            break;
        }
    }
    // Sub-page leftovers too.
    while file.write(&[0u8]).is_ok() {}
    path
}

fn keyed(store: &Arc<FileIdempotencyStore>) -> Keyed {
    Keyed::new(
        store.clone() as Arc<dyn IdempotencyStore>,
        Arc::new(SystemClock),
        Duration::from_secs(90),
    )
    .unwrap()
}

fn open_store(dir: &Path) -> Arc<FileIdempotencyStore> {
    let settings = FileIdempotencySettings::new(Duration::from_secs(90), Duration::from_secs(3600));
    Arc::new(FileIdempotencyStore::open(dir, settings).unwrap())
}

#[test]
fn a_full_disk_fails_claims_closed_but_never_a_completion() {
    let mount = Mount::new(&["-t", "tmpfs", "-o", "size=1m", "tmpfs"]);
    let store = open_store(&mount.path);
    let keyed = keyed(&store);
    let clock = SystemClock;
    let runs = std::sync::atomic::AtomicU32::new(0);
    let fp = fingerprint(b"p");
    assert!(!keyed
        .execute(&clock, b"before", &fp, counted_op(&runs))
        .result
        .unwrap());

    // Claims outstanding when the disk fills up still complete.
    let outstanding: Vec<(String, ClaimToken)> = (0..20)
        .map(|i| {
            let key = format!("outstanding-{i}");
            match store.claim(key.as_bytes(), &fp, 1).unwrap() {
                Claim::Acquired {
                    token,
                    taken_over: false,
                } => (key, token),
                other => panic!("{key}: {other:?}"),
            }
        })
        .collect();
    let filler = fill(&mount.path);
    for (key, token) in &outstanding {
        let done = store.complete(key.as_bytes(), *token, &fp, 0, 2).unwrap();
        assert_eq!(done, Completion::Recorded);
    }

    // New keys run while the reserved room lasts, then fail closed: never run unrecorded.
    let mut ran = 0;
    let failure = loop {
        let key = format!("new-{ran}");
        let before = runs.load(std::sync::atomic::Ordering::SeqCst);
        match keyed
            .execute(&clock, key.as_bytes(), &fp, counted_op(&runs))
            .result
        {
            Ok(replayed) => assert!(!replayed),
            Err(failure) => {
                assert_eq!(
                    runs.load(std::sync::atomic::Ordering::SeqCst),
                    before,
                    "ran unrecorded"
                );
                break failure;
            }
        }
        ran += 1;
        assert!(ran < 5000, "a full disk never refused a claim");
    };
    assert_eq!(
        failure.code(),
        ErrorCode::DiskFull as i32,
        "{}",
        failure.detail()
    );
    assert!(failure.detail().contains("journal"), "{}", failure.detail());
    // Every key that ran is completed and replays; reading needs no room.
    for i in 0..ran {
        let out = keyed.execute(
            &clock,
            format!("new-{i}").as_bytes(),
            &fp,
            counted_op(&runs),
        );
        assert!(out.result.unwrap(), "new-{i} replayed");
    }
    assert!(keyed
        .execute(&clock, b"before", &fp, counted_op(&runs))
        .result
        .unwrap());
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst) as usize,
        1 + ran
    );

    // Room again: work resumes.
    fs::remove_file(filler).unwrap();
    assert!(!keyed
        .execute(&clock, b"after", &fp, counted_op(&runs))
        .result
        .unwrap());
}

#[test]
fn a_nearly_full_disk_runs_claims_while_their_room_is_there() {
    let mount = Mount::new(&["-t", "tmpfs", "-o", "size=256k", "tmpfs"]);
    let store = open_store(&mount.path);
    let keyed = keyed(&store);
    let clock = SystemClock;
    let runs = std::sync::atomic::AtomicU32::new(0);
    let fp = fingerprint(b"p");
    // 12 KiB left: far less than a claim's usual 64 KiB reservation ahead.
    let filler = fill(&mount.path);
    let len = fs::metadata(&filler).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(len - 12 * 1024)
        .unwrap();
    let mut ran = 0;
    let failure = loop {
        let key = format!("key-{ran}");
        match keyed
            .execute(&clock, key.as_bytes(), &fp, counted_op(&runs))
            .result
        {
            Ok(replayed) => assert!(!replayed),
            Err(failure) => break failure,
        }
        ran += 1;
        assert!(ran < 2000, "a full disk never refused a claim");
    };
    assert_eq!(
        failure.code(),
        ErrorCode::DiskFull as i32,
        "{}",
        failure.detail()
    );
    assert!(ran >= 5, "only {ran} claims ran in 12 KiB");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst) as usize, ran);
    for i in 0..ran {
        let out = keyed.execute(
            &clock,
            format!("key-{i}").as_bytes(),
            &fp,
            counted_op(&runs),
        );
        assert!(out.result.unwrap(), "key-{i} replayed");
    }
}

#[test]
fn a_read_only_state_dir_runs_nothing() {
    let source = tempfile::tempdir().unwrap();
    drop(open_store(source.path()));
    let mount = Mount::new(&["--bind", "-o", "ro", source.path().to_str().unwrap()]);
    let _ = Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&mount.path)
        .status();
    let settings = FileIdempotencySettings::new(Duration::from_secs(90), Duration::from_secs(3600));
    let err = FileIdempotencyStore::open(&mount.path, settings)
        .err()
        .expect("refused");
    assert_eq!(
        err.code(),
        ErrorCode::PermissionDenied as i32,
        "{}",
        err.detail()
    );
}
