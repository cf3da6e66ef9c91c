//! Deterministic simulation of the idempotency store (ABI §8).
//!
//! Several store handles ("processes") share one directory; callers bound to them claim,
//! renew, complete, release, crash and stall, in an order drawn from a seeded generator,
//! over a manual clock that lets leases lapse. After every step the §8 invariants are
//! checked against an oracle of what each caller knows. A failure prints its seed, and
//! `SIM_SEED=<seed> cargo test --test idempotency_simulation` replays it exactly;
//! `SIM_SEEDS=<n>` runs more seeds.

use backup_coordinator::idempotency::file_store::{FileStore, FileStoreSettings};
use backup_coordinator::idempotency::{
    Claim, ClaimToken, Completion, Fingerprint, IdempotencyStore, KeyRecord, KeyState,
};
use std::path::Path;
use std::time::Duration;

const LEASE_MS: u64 = 1_000;
const TTL_MS: u64 = 20_000;
const KEYS: [&[u8]; 2] = [b"key-a", b"key-b"];
const FINGERPRINTS: [Fingerprint; 2] = [[0xa; 32], [0xb; 32]];

#[derive(Debug, Clone, Copy)]
enum Caller {
    Idle,
    /// Runs key `key` as the claim `token`; its lease, as far as its renewals went.
    Running {
        key: usize,
        fp: usize,
        token: ClaimToken,
        lease_until: u64,
    },
}

struct World {
    stores: Vec<FileStore>,
    /// Each caller's handle, and its state.
    callers: Vec<(usize, Caller)>,
    now: u64,
    /// The fingerprint of the last completion recorded for each key (the oracle).
    completed_with: [Option<(usize, u64)>; 2],
    /// Operations that succeeded per key and fingerprint, for replay checks.
    succeeded: [[u32; 2]; 2],
    log: Vec<String>,
}

impl World {
    fn record(&self, key: usize) -> Option<KeyRecord> {
        self.stores[0].get(KEYS[key], self.now).expect("get")
    }

    /// The token of the live claim on `key`, if any.
    fn live_claim(&self, key: usize) -> Option<ClaimToken> {
        match self.record(key)?.state {
            KeyState::Claimed { token, .. } => Some(token),
            KeyState::Completed { .. } => None,
        }
    }

    fn fail(&self, seed: u64, why: String) -> ! {
        let tail: Vec<_> = self.log.iter().rev().take(25).rev().cloned().collect();
        panic!(
            "seed {seed}: {why}\nreplay with SIM_SEED={seed}\nlast steps:\n  {}",
            tail.join("\n  ")
        );
    }
}

fn run_seed(seed: u64, dir: &Path) {
    let settings = FileStoreSettings {
        lease: Duration::from_millis(LEASE_MS),
        ttl: Duration::from_millis(TTL_MS),
        // Small, so that compactions happen under the callers.
        compaction_slack_bytes: 4096,
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let handles = rng.usize(1..=3);
    let stores: Vec<FileStore> = (0..handles)
        .map(|_| FileStore::open(dir, settings).expect("open"))
        .collect();
    let callers = (0..rng.usize(2..=5))
        .map(|_| (rng.usize(0..handles), Caller::Idle))
        .collect();
    let mut w = World {
        stores,
        callers,
        now: 1_000_000,
        completed_with: [None; 2],
        succeeded: [[0; 2]; 2],
        log: Vec::new(),
    };
    for step in 0..150 {
        let c = rng.usize(0..w.callers.len());
        let (handle, state) = w.callers[c];
        let store = &w.stores[handle];
        match (rng.u32(0..100), state) {
            // Time passes: usually a little, sometimes past a lease (a stall).
            (0..=14, _) => {
                let by = if rng.u32(0..4) == 0 {
                    rng.u64(LEASE_MS..3 * LEASE_MS)
                } else {
                    rng.u64(0..LEASE_MS / 3)
                };
                w.now += by;
                w.log.push(format!("{step}: time +{by} -> {}", w.now));
            }
            (15..=19, _) => {
                store.maintain(w.now).expect("maintain");
                w.log.push(format!("{step}: handle {handle} maintains"));
            }
            (_, Caller::Idle) => {
                let key = rng.usize(0..2);
                let fp = rng.usize(0..2);
                // What the key holds before, as the oracle sees it.
                let before = w.record(key);
                let others_live: Vec<(usize, u64)> = w
                    .callers
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, s))| match *s {
                        Caller::Running {
                            key: k,
                            lease_until,
                            ..
                        } if k == key && i != c => Some((i, lease_until)),
                        _ => None,
                    })
                    .collect();
                let claim = store.claim(KEYS[key], &FINGERPRINTS[fp], w.now);
                w.log.push(format!(
                    "{step}: caller {c} (handle {handle}) claims key {key} fp {fp}: {claim:?}"
                ));
                match claim.expect("claim") {
                    Claim::Acquired { token, .. } => {
                        // No key runs twice unless its owner's lease lapsed.
                        if let Some((other, until)) =
                            others_live.iter().find(|(_, until)| *until > w.now)
                        {
                            w.fail(seed, format!("caller {c} acquired key {key} while caller {other} runs it with a lease until {until}"));
                        }
                        w.callers[c].1 = Caller::Running {
                            key,
                            fp,
                            token,
                            lease_until: w.now + LEASE_MS,
                        };
                    }
                    Claim::Replay { result } => {
                        let fp_done = w.completed_with[key].map(|(f, _)| f);
                        if result != 0 || fp_done != Some(fp) || w.succeeded[key][fp] == 0 {
                            w.fail(seed, format!("replay of key {key} fp {fp} (result {result}) but the oracle's completion is {fp_done:?}"));
                        }
                    }
                    Claim::Conflict => {
                        if before.is_some_and(|r| r.fingerprint == FINGERPRINTS[fp]) {
                            w.fail(
                                seed,
                                format!("conflict on key {key} with the stored fingerprint {fp}"),
                            );
                        }
                    }
                    Claim::InProgress => {
                        if !matches!(before.map(|r| r.state), Some(KeyState::Claimed { .. })) {
                            w.fail(
                                seed,
                                format!("in progress on key {key}, which holds no live claim"),
                            );
                        }
                    }
                }
            }
            (
                roll,
                Caller::Running {
                    key,
                    fp,
                    token,
                    lease_until,
                },
            ) => {
                let holder_before = w.live_claim(key);
                let mine = holder_before == Some(token);
                match roll {
                    // The keeper renews the lease.
                    20..=49 => {
                        store
                            .renew(&[(KEYS[key].to_vec(), token)], w.now)
                            .expect("renew");
                        let holder_after = w.live_claim(key);
                        if holder_before.is_some() && holder_after != holder_before {
                            w.fail(seed, format!("caller {c}'s renewal changed key {key}'s claim from {holder_before:?} to {holder_after:?}"));
                        }
                        if mine {
                            w.callers[c].1 = Caller::Running {
                                key,
                                fp,
                                token,
                                lease_until: w.now + LEASE_MS,
                            };
                        }
                        w.log.push(format!(
                            "{step}: caller {c} renews key {key} (current: {mine})"
                        ));
                    }
                    // The operation succeeded: complete.
                    50..=74 => {
                        let done = store
                            .complete(KEYS[key], token, &FINGERPRINTS[fp], 0, w.now)
                            .expect("complete");
                        w.succeeded[key][fp] += 1;
                        let after = w.record(key);
                        w.log.push(format!(
                            "{step}: caller {c} completes key {key} fp {fp}: {done:?} -> {after:?}"
                        ));
                        match done {
                            Completion::Recorded => {
                                if holder_before.is_some_and(|h| h != token) {
                                    w.fail(seed, format!("caller {c}'s completion overwrote the live claim {holder_before:?} of key {key}"));
                                }
                                match after {
                                    Some(KeyRecord {
                                        fingerprint,
                                        state: KeyState::Completed { .. },
                                    }) if fingerprint == FINGERPRINTS[fp] => {}
                                    other => w.fail(seed, format!("completion of key {key} recorded as {other:?}, not with fp {fp}")),
                                }
                                w.completed_with[key] = Some((fp, w.now + TTL_MS));
                            }
                            Completion::Superseded => {
                                if mine || w.record(key).is_none() {
                                    w.fail(seed, format!("caller {c}'s completion of key {key} was refused although the key was its own or free"));
                                }
                            }
                        }
                        w.callers[c].1 = Caller::Idle;
                    }
                    // The operation failed: release.
                    75..=89 => {
                        store.release(KEYS[key], token).expect("release");
                        let holder_after = w.live_claim(key);
                        w.log.push(format!(
                            "{step}: caller {c} releases key {key} (current: {mine}) -> {holder_after:?}"
                        ));
                        if !mine && holder_before.is_some() && holder_after != holder_before {
                            w.fail(seed, format!("caller {c}'s release freed another claim {holder_before:?} of key {key}"));
                        }
                        if mine && holder_after.is_some() {
                            w.fail(
                                seed,
                                format!("caller {c}'s release left its claim on key {key}"),
                            );
                        }
                        w.callers[c].1 = Caller::Idle;
                    }
                    // The caller dies: its claim stays until the lease runs out.
                    _ => {
                        w.log.push(format!(
                            "{step}: caller {c} dies holding key {key} (lease until {lease_until})"
                        ));
                        w.callers[c].1 = Caller::Idle;
                    }
                }
            }
        }
        // After every step: a completed record always carries the fingerprint of the
        // completion that wrote it, and the store agrees across handles.
        for (key, name) in KEYS.iter().enumerate() {
            let views: Vec<_> = w
                .stores
                .iter()
                .map(|s| s.get(name, w.now).expect("get"))
                .collect();
            if views.windows(2).any(|v| v[0] != v[1]) {
                w.fail(seed, format!("handles disagree on key {key}: {views:?}"));
            }
            if let Some(KeyRecord {
                fingerprint,
                state: KeyState::Completed { .. },
            }) = views[0]
            {
                let expected = w.completed_with[key].map(|(f, _)| FINGERPRINTS[f]);
                if expected != Some(fingerprint) {
                    w.fail(
                        seed,
                        format!(
                            "key {key} completed with a fingerprint no recorded completion had"
                        ),
                    );
                }
            }
        }
    }
}

fn sim_dir() -> tempfile::TempDir {
    // A tmpfs when there is one: the simulation checks logic, not the disk's fsync speed.
    match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap()),
        false => tempfile::tempdir().unwrap(),
    }
}

#[test]
fn the_store_keeps_the_section_8_invariants_under_random_interleavings() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let dir = sim_dir();
        run_seed(seed.parse().expect("SIM_SEED is a number"), dir.path());
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let base = 0x5eed_0000u64;
    for seed in base..base + seeds {
        let dir = sim_dir();
        run_seed(seed, dir.path());
    }
}
