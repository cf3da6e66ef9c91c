//! Compactions racing with callers: threads of this process and of a second process claim
//! and complete keys (their own and keys they contend for) while both processes compact
//! the shared journal over and over and follow each other's new journals. No key is lost
//! (every completion replays afterwards, from a fresh handle) and no contended key runs
//! twice.
//!
//! The second process is this test binary run again with `RACE_ROLE=child`.

#[path = "common/child.rs"]
mod child;

use backup_coordinator::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
use backup_coordinator::idempotency::{fingerprint, Claim, IdempotencyStore};
use child::Child;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const NOW_MS: u64 = 1_000_000;
/// Keys both processes contend for.
const SHARED: u64 = 3000;
/// Keys of its own each thread claims and completes.
const OWN: u64 = 2500;
const THREADS: u64 = 3;

fn settings() -> FileIdempotencySettings {
    FileIdempotencySettings {
        lease: Duration::from_secs(600),
        ttl: Duration::from_secs(3600),
        // Compaction is due every few hundred KB: dozens of them during the test.
        compaction_slack_bytes: 64 << 10,
    }
}

fn shared_key(i: u64) -> Vec<u8> {
    format!("shared-{i}").into_bytes()
}

/// Runs the callers and a compacting thread against the store in `dir`; returns the
/// contended keys whose "operation" ran here, and the own keys completed.
fn work(dir: &Path, name: &str) -> (Vec<u64>, Vec<Vec<u8>>) {
    let store = FileIdempotencyStore::open(dir, settings()).unwrap();
    let ran = Mutex::new(Vec::new());
    let own = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let compactor = scope.spawn(|| {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                // Due compactions, and forced ones in between.
                store.maintain(NOW_MS).unwrap();
                if n % 4 == 0 {
                    store.compact_now(NOW_MS).unwrap();
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let callers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, ran, own) = (&store, &ran, &own);
                scope.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t + name.len() as u64 * 100);
                    for j in 0..OWN {
                        // An own key, then a contended one picked at random.
                        let key = format!("{name}-{t}-{j}").into_bytes();
                        let fp = fingerprint(&key);
                        let Claim::Acquired { token, .. } = store.claim(&key, &fp, NOW_MS).unwrap()
                        else {
                            panic!("own key {j} of {name} not acquired");
                        };
                        store.complete(&key, token, &fp, 0, NOW_MS).unwrap();
                        own.lock().unwrap().push(key);
                        let i = rng.u64(0..SHARED);
                        let key = shared_key(i);
                        let fp = fingerprint(&key);
                        match store.claim(&key, &fp, NOW_MS).unwrap() {
                            Claim::Acquired { token, .. } => {
                                ran.lock().unwrap().push(i);
                                store.complete(&key, token, &fp, 0, NOW_MS).unwrap();
                            }
                            Claim::Replay { result: 0 } | Claim::InProgress => {}
                            other => panic!("{other:?} for a contended key"),
                        }
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        compactor.join().unwrap();
    });
    assert!(store.compactions() > 0, "{name} never compacted");
    (ran.into_inner().unwrap(), own.into_inner().unwrap())
}

#[test]
fn compactions_in_two_processes_lose_no_key_and_run_none_twice() {
    if let Ok(dir) = std::env::var("RACE_DIR") {
        if std::env::var("RACE_ROLE").as_deref() == Ok("child") {
            // The second process: reports what it ran, one line a key, to the parent.
            let (ran, own) = work(Path::new(&dir), "child");
            for i in ran {
                println!("ran {i}");
            }
            println!("own {}", own.len());
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Child::command("compactions_in_two_processes_lose_no_key_and_run_none_twice")
        .env("RACE_ROLE", "child")
        .env("RACE_DIR", dir.path())
        .spawn();
    let started = Instant::now();
    let (mut ran, own) = work(dir.path(), "parent");
    let mut child_own = 0;
    for line in child.lines() {
        if let Some(i) = line.strip_prefix("ran ") {
            ran.push(i.parse().unwrap());
        } else if let Some(n) = line.strip_prefix("own ") {
            child_own = n.parse().unwrap();
        }
    }
    assert!(child.wait().success(), "the child process failed");
    assert_eq!(child_own, THREADS * OWN, "the child finished its keys");
    // No contended key ran twice, in either process.
    let mut runs: HashMap<u64, u32> = HashMap::new();
    for i in &ran {
        *runs.entry(*i).or_default() += 1;
    }
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    // Nothing lost: every completion replays from a fresh handle, the one run of a
    // contended key too; the journal was compacted many times meanwhile.
    let fresh = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
    let replays = |key: &[u8]| fresh.claim(key, &fingerprint(key), NOW_MS + 1).unwrap();
    for key in &own {
        assert_eq!(replays(key), Claim::Replay { result: 0 }, "{key:?}");
    }
    for t in 0..THREADS {
        for j in 0..OWN {
            let key = format!("child-{t}-{j}").into_bytes();
            assert_eq!(replays(&key), Claim::Replay { result: 0 }, "{key:?}");
        }
    }
    for i in runs.keys() {
        assert_eq!(replays(&shared_key(*i)), Claim::Replay { result: 0 }, "{i}");
    }
    eprintln!(
        "{} contended keys ran once each, {} own keys kept, in {:?}",
        runs.len(),
        own.len() + child_own as usize,
        started.elapsed()
    );
}
