//! The idempotency journal reader, through the public API only (so the target outlives a
//! change of the on-disk format): a journal written by the store, then damaged (bytes
//! flipped, cut, garbage appended) or replaced by arbitrary bytes, is reopened with
//! `FileIdempotencyStore::open` and every key asked for with `get` and `claim`.
//!
//! Must hold: open, get and claim return Ok or BACKUP_ERROR_DATA_CORRUPTION (FILE_IO for
//! I/O itself), never panic; and a key is never replayed with a result or fingerprint
//! that no completion of that key recorded (a wrong replay would skip an operation that
//! never ran with that payload).
#![no_main]

use arbitrary::Arbitrary;
use backup_coordinator::error::ErrorCode;
use backup_coordinator::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
use backup_coordinator::idempotency::{Claim, IdempotencyStore, KeyState};
use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const NOW: u64 = 1_700_000_000_000;
const KEYS: u8 = 6;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Claim then complete with `result`.
    Complete {
        key: u8,
        payload: u8,
        result: i32,
    },
    /// Claim, then release (the operation failed).
    Release {
        key: u8,
        payload: u8,
    },
    /// Claim and leave the claim in place (a crashed caller).
    Abandon {
        key: u8,
        payload: u8,
    },
    Forget {
        key: u8,
    },
}

#[derive(Arbitrary, Debug)]
enum Damage {
    Flip { at: u16, xor: u8 },
    Cut { len: u16 },
    Append { bytes: Vec<u8> },
    Replace { bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
    damage: Vec<Damage>,
}

fn key_of(k: u8) -> Vec<u8> {
    format!("fuzz-key-{}", k % KEYS).into_bytes()
}

fn fingerprint_of(payload: u8) -> [u8; 32] {
    backup_coordinator::idempotency::fingerprint(&[payload % 4])
}

fn allowed(code: i32) -> bool {
    code == ErrorCode::DataCorruption.raw() || code == ErrorCode::FileIo.raw()
}

fn settings() -> FileIdempotencySettings {
    FileIdempotencySettings::new(Duration::from_secs(60), Duration::from_secs(86_400))
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs when there is one: the store fsyncs, and the fuzzer should not wait on a disk.
    let base = std::path::Path::new("/dev/shm");
    if base.is_dir() {
        tempfile::tempdir_in(base).expect("temp dir")
    } else {
        tempfile::tempdir().expect("temp dir")
    }
}

fuzz_target!(|input: Input| {
    if input.ops.len() > 24 || input.damage.len() > 8 {
        return;
    }
    let dir = scratch_dir();
    // Every (fingerprint, result) a completion of each key recorded.
    let mut completed: HashMap<Vec<u8>, HashSet<([u8; 32], i32)>> = HashMap::new();
    {
        let store =
            FileIdempotencyStore::open(dir.path(), settings()).expect("a fresh store opens");
        for op in &input.ops {
            match *op {
                Op::Complete {
                    key,
                    payload,
                    result,
                } => {
                    let (key, fp) = (key_of(key), fingerprint_of(payload));
                    if let Ok(Claim::Acquired { token, .. }) = store.claim(&key, &fp, NOW) {
                        store
                            .complete(&key, token, &fp, result, NOW)
                            .expect("complete on a sound store");
                        completed.entry(key).or_default().insert((fp, result));
                    }
                }
                Op::Release { key, payload } => {
                    let (key, fp) = (key_of(key), fingerprint_of(payload));
                    if let Ok(Claim::Acquired { token, .. }) = store.claim(&key, &fp, NOW) {
                        store
                            .release(&key, token)
                            .expect("release on a sound store");
                    }
                }
                Op::Abandon { key, payload } => {
                    let _ = store.claim(&key_of(key), &fingerprint_of(payload), NOW);
                }
                Op::Forget { key } => {
                    let _ = store.forget(&key_of(key), NOW);
                }
            }
        }
    }
    let journal = dir.path().join("idempotency").join("journal");
    let mut bytes = std::fs::read(&journal).unwrap_or_default();
    for damage in &input.damage {
        match damage {
            Damage::Flip { at, xor } => {
                if !bytes.is_empty() {
                    let i = *at as usize % bytes.len();
                    bytes[i] ^= xor;
                }
            }
            Damage::Cut { len } => bytes.truncate(*len as usize),
            Damage::Append { bytes: more } => bytes.extend_from_slice(more),
            Damage::Replace { bytes: all } => bytes = all.clone(),
        }
    }
    std::fs::write(&journal, &bytes).expect("write the damaged journal");

    let store = match FileIdempotencyStore::open(dir.path(), settings()) {
        Ok(store) => store,
        Err(failure) => {
            assert!(allowed(failure.code()), "open failed with {failure:?}");
            return;
        }
    };
    let check_replay = |key: &[u8], fp: [u8; 32], result: i32| {
        let known = completed
            .get(key)
            .is_some_and(|set| set.contains(&(fp, result)));
        assert!(
            known,
            "key {:?} replays result {result} with a fingerprint no completion recorded for it",
            String::from_utf8_lossy(key)
        );
    };
    for k in 0..KEYS {
        let key = key_of(k);
        match store.get(&key, NOW) {
            Ok(Some(record)) => {
                if let KeyState::Completed { result, .. } = record.state {
                    check_replay(&key, record.fingerprint, result);
                }
            }
            Ok(None) => {}
            Err(failure) => assert!(allowed(failure.code()), "get failed with {failure:?}"),
        }
        for payload in 0..4 {
            let fp = fingerprint_of(payload);
            match store.claim(&key, &fp, NOW) {
                Ok(Claim::Replay { result }) => check_replay(&key, fp, result),
                Ok(Claim::Acquired { token, .. }) => {
                    let _ = store.release(&key, token);
                }
                Ok(_) => {}
                Err(failure) => assert!(allowed(failure.code()), "claim failed with {failure:?}"),
            }
        }
    }
});
