//! Deterministic simulation of the idempotency store (C_API §8).
//!
//! Several store handles ("processes") share one directory; callers bound to them claim,
//! renew, complete, release, crash and stall, in an order drawn from a seeded generator,
//! over a manual clock that lets leases lapse. After every step the §8 invariants are
//! checked against an oracle of what each caller knows. A failure prints its seed, and
//! `SIM_SEED=<seed> cargo test --test idempotency_simulation` replays it exactly;
//! `SIM_SEEDS=<n>` runs more seeds.

use backup_coordinator::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
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
    stores: Vec<FileIdempotencyStore>,
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
    let settings = FileIdempotencySettings {
        lease: Duration::from_millis(LEASE_MS),
        ttl: Duration::from_millis(TTL_MS),
        // Small, so that compactions happen under the callers.
        compaction_slack_bytes: 4096,
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let handles = rng.usize(1..=3);
    let stores: Vec<FileIdempotencyStore> = (0..handles)
        .map(|_| FileIdempotencyStore::open(dir, settings).expect("open"))
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

// ---------------------------------------------------------------------------------------
// The owners' side (docs/C_API.md §8.1): each handle's lease keeper, with renewals that
// fail (a handle cut off), maintenance that takes longer than a lease while renewals go
// on beside it, completions and releases whose answers are lost and retried, stalls.
// Invariants after every step: a claim is never taken over while its owner's keeper says
// it is held; the tokens of a key's claims strictly increase; a claim held in the view is
// the key's claim in the store.

use backup_coordinator::clock::{Clock, ManualClock};
use backup_coordinator::error::{Error, ErrorCode};
use backup_coordinator::idempotency::lease::LeaseKeeper;
use backup_coordinator::idempotency::{ClaimId, Forgotten};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// A handle whose renewals can be cut off, and whose answers can be lost after the store
/// applied the request.
struct Faulty {
    store: FileIdempotencyStore,
    cut_off: AtomicBool,
    lose_next_answer: AtomicBool,
}

impl Faulty {
    fn answer<T>(&self, applied: Result<T, Error>) -> Result<T, Error> {
        let value = applied?;
        match self.lose_next_answer.swap(false, Ordering::SeqCst) {
            true => Err(Error::etcd(ErrorCode::Timeout, "answer lost")),
            false => Ok(value),
        }
    }
}

impl IdempotencyStore for Faulty {
    fn claim_as(
        &self,
        key: &[u8],
        fp: &Fingerprint,
        now: u64,
        id: ClaimId,
    ) -> Result<Claim, Error> {
        self.store.claim_as(key, fp, now, id)
    }
    fn renew(
        &self,
        claims: &[(Vec<u8>, ClaimToken)],
        now: u64,
    ) -> Result<Vec<(Vec<u8>, ClaimToken)>, Error> {
        if self.cut_off.load(Ordering::SeqCst) {
            return Err(Error::etcd(ErrorCode::ConnectionLost, "cut off"));
        }
        self.store.renew(claims, now)
    }
    fn complete(
        &self,
        key: &[u8],
        token: ClaimToken,
        fp: &Fingerprint,
        result: i32,
        now: u64,
    ) -> Result<Completion, Error> {
        self.answer(self.store.complete(key, token, fp, result, now))
    }
    fn release(&self, key: &[u8], token: ClaimToken) -> Result<(), Error> {
        self.answer(self.store.release(key, token))
    }
    fn get(&self, key: &[u8], now: u64) -> Result<Option<KeyRecord>, Error> {
        self.store.get(key, now)
    }
    fn forget(&self, key: &[u8], now: u64) -> Result<Forgotten, Error> {
        self.store.forget(key, now)
    }
    fn maintain(&self, now: u64) -> Result<(), Error> {
        self.store.maintain(now)
    }
}

struct Owner {
    handle: usize,
    /// The key and claim it runs, if any.
    running: Option<(usize, ClaimToken)>,
}

fn run_owner_seed(seed: u64, dir: &Path) {
    let settings = FileIdempotencySettings {
        lease: Duration::from_millis(LEASE_MS),
        ttl: Duration::from_millis(TTL_MS),
        compaction_slack_bytes: 4096,
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let clock = ManualClock::new(1_000_000);
    let handles: Vec<Faulty> = (0..rng.usize(1..=3))
        .map(|_| Faulty {
            store: FileIdempotencyStore::open(dir, settings).expect("open"),
            cut_off: AtomicBool::new(false),
            lose_next_answer: AtomicBool::new(false),
        })
        .collect();
    // The keepers' threads find no store and end: the steps below are their work.
    let keepers: Vec<LeaseKeeper> = handles
        .iter()
        .map(|_| {
            let none: Weak<dyn IdempotencyStore> = Weak::<FileIdempotencyStore>::new();
            LeaseKeeper::start(none, Arc::new(clock.clone()), settings.lease).expect("keeper")
        })
        .collect();
    let mut owners: Vec<Owner> = (0..rng.usize(2..=5))
        .map(|_| Owner {
            handle: rng.usize(0..handles.len()),
            running: None,
        })
        .collect();
    let mut last_token = [0u64; 2];
    let mut log: Vec<String> = Vec::new();
    let fail = |log: &[String], why: String| -> ! {
        let tail: Vec<_> = log.iter().rev().take(25).rev().cloned().collect();
        panic!(
            "seed {seed}: {why}\nreplay with SIM_SEED={seed}\nlast steps:\n  {}",
            tail.join("\n  ")
        );
    };
    for step in 0..200 {
        let now = clock.unix_ms();
        let o = rng.usize(0..owners.len());
        let h = owners[o].handle;
        let (store, keeper) = (&handles[h], &keepers[h]);
        match rng.u32(0..100) {
            // Time passes: a little, or past a lease (every process stalls alike).
            0..=14 => {
                let by = match rng.u32(0..5) {
                    0 => rng.u64(LEASE_MS..3 * LEASE_MS),
                    _ => rng.u64(0..LEASE_MS / 3),
                };
                clock.advance(Duration::from_millis(by));
                log.push(format!("{step}: time +{by}"));
            }
            // A handle is cut off from the store, or comes back.
            15..=19 => {
                let cut = !store.cut_off.load(Ordering::SeqCst);
                store.cut_off.store(cut, Ordering::SeqCst);
                log.push(format!("{step}: handle {h} cut off: {cut}"));
            }
            // The renewer's tick.
            20..=44 => {
                keeper.renew_now(store, now);
                log.push(format!("{step}: handle {h} renews"));
            }
            // Maintenance that takes longer than a lease; the renewer ticks beside it.
            45..=49 => {
                store.maintain(now).expect("maintain");
                for _ in 0..rng.u32(3..9) {
                    clock.advance(Duration::from_millis(LEASE_MS / 3));
                    keeper.renew_now(store, clock.unix_ms());
                }
                log.push(format!(
                    "{step}: handle {h} maintains for long, renewing beside it"
                ));
            }
            roll => match owners[o].running {
                None => {
                    let key = rng.usize(0..2);
                    let sent = clock.monotonic_ms();
                    let claim = store.claim_as(KEYS[key], &FINGERPRINTS[0], now, ClaimId::new());
                    log.push(format!(
                        "{step}: owner {o} (handle {h}) claims key {key}: {claim:?}"
                    ));
                    if let Claim::Acquired { token, .. } = claim.expect("claim") {
                        for (other, owner) in owners.iter().enumerate() {
                            let Some((k, t)) = owner.running else {
                                continue;
                            };
                            if k == key && keepers[owner.handle].view(KEYS[k], t) == Some(true) {
                                fail(&log, format!("owner {o} took key {key} while owner {other}'s keeper holds it (token {t:?})"));
                            }
                        }
                        if token.0 <= last_token[key] {
                            fail(
                                &log,
                                format!(
                                    "token {token:?} of key {key} not above {}",
                                    last_token[key]
                                ),
                            );
                        }
                        last_token[key] = token.0;
                        // Held until the owner ends (the guard's drop is the call's end).
                        std::mem::forget(keeper.hold(KEYS[key], token, sent));
                        owners[o].running = Some((key, token));
                    }
                }
                Some((key, token)) => {
                    // The answer of what follows may be lost; it is then retried once.
                    store.lose_next_answer.store(rng.bool(), Ordering::SeqCst);
                    let done = if roll < 80 {
                        let first = store.complete(KEYS[key], token, &FINGERPRINTS[0], 0, now);
                        let retried = first.is_err();
                        let done = first.or_else(|_| {
                            store.complete(KEYS[key], token, &FINGERPRINTS[0], 0, now)
                        });
                        format!("completes (retried: {retried}): {done:?}")
                    } else {
                        let first = store.release(KEYS[key], token);
                        let retried = first.is_err();
                        let done = first.or_else(|_| store.release(KEYS[key], token));
                        format!("releases (retried: {retried}): {done:?}")
                    };
                    log.push(format!("{step}: owner {o} {done}"));
                    if done.contains("Err") {
                        fail(&log, format!("owner {o}'s retried call failed: {done}"));
                    }
                    owners[o].running = None;
                }
            },
        }
        // A claim its owner's keeper holds is the key's claim in the store.
        let now = clock.unix_ms();
        for (i, owner) in owners.iter().enumerate() {
            let Some((key, token)) = owner.running else {
                continue;
            };
            if keepers[owner.handle].view(KEYS[key], token) == Some(true) {
                let record = handles[0].get(KEYS[key], now).expect("get");
                let current = matches!(record.map(|r| r.state), Some(KeyState::Claimed { token: t, .. }) if t == token);
                if !current {
                    fail(&log, format!("owner {i}'s keeper holds key {key} (token {token:?}) but the store has {record:?}"));
                }
            }
        }
    }
}

#[test]
fn owners_views_hold_under_renewal_failures_long_maintenance_and_lost_answers() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let dir = sim_dir();
        run_owner_seed(seed.parse().expect("SIM_SEED is a number"), dir.path());
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    for seed in 0x0e_0000u64..0x0e_0000 + seeds {
        let dir = sim_dir();
        run_owner_seed(seed, dir.path());
    }
}
