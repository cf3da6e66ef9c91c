//! Idempotency keys (C_API §8) on etcd (§9).
//!
//! A key lives at `<prefix>i/<base64url of the key>`. A claim is one transaction, compared
//! on the key's revision, that puts a claim record (the call's [`ClaimId`], fingerprint,
//! lease until) bound to the lease of the plugin instance's session (`super::session`: one
//! lease per host, not per claim). The claim's fencing token is the revision of that put
//! (docs/C_API.md §8.1): etcd's revision is cluster-wide and only grows, so every later
//! claim of the key, through any member and from any host, has a greater one; keep-alives
//! do not change it, and read back it is the key's `mod_revision`. The value holds the
//! call's identity rather than the token (the revision is not known before the put): a
//! retry of the same call whose earlier answer was lost finds its own claim and acquires it
//! with that claim's token.
//!
//! The session is kept alive by the runtime while the process lives, so a dead or stalled
//! host's claims vanish when its session lapses. The lease keeper's renewals of a claim are
//! keep-alives of the session (one for all the claims due, shared with concurrent callers),
//! answered Ok only once etcd acknowledged one sent no earlier than the call; an acquired
//! claim is vouched for the same way (a keep-alive sent alongside its transaction), so the
//! keeper's view from the claim's sending (docs/C_API.md §8.1) never outlasts the session.
//! Completion is compared on the key's `mod_revision` being the claim's token (still our
//! claim) or on the key being free or expired, and puts a completion record (token,
//! fingerprint, result, expiry) bound to a shared lease of `idempotency_ttl` plus a little:
//! etcd deletes completions soon after they expire, so its space stays bounded by the live
//! keys. Release is one compare-and-delete on the token. A new key that completes costs two
//! raft writes: its claim and its completion.
//!
//! Records are fixed-size binary (49 bytes a claim, 53 a completion; text took about 95):
//! the keys live by the million, and etcd's space is the cluster's quota. The first byte
//! names the layout; the layout of earlier builds, whose token field held a lease ID, is
//! still read (such a claim is never ours; its token is its `mod_revision` all the same).

use super::client::{Conn, TxnOutcome};
use super::session::Session;
use super::EtcdClient;
use crate::error::{ErrorCode, Failure};
use crate::idempotency::{
    decide, display_key, Claim, ClaimId, ClaimToken, Completion, Fingerprint, Forgotten,
    IdempotencyStore, KeyRecord, KeyState, Lapsed,
};
use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, TxnOp};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rounds of "the key changed under us, look again" before giving up; each round is a
/// real change of the key by another caller.
const MAX_ROUNDS: usize = 32;

pub struct EtcdIdempotencyStore {
    etcd: Arc<EtcdClient>,
    /// The instance's session: every claim of this handle is bound to its lease.
    session: Arc<Session>,
    lease: Duration,
    ttl: Duration,
    completions: Arc<Completions>,
    calls: Arc<Mutex<Calls>>,
}

/// The completion lease of this handle, and one grant of it at a time (concurrent first
/// completions share one).
#[derive(Default)]
struct Completions {
    current: Mutex<Option<CompletionLease>>,
    granting: tokio::sync::Mutex<()>,
}

/// The lease completions are bound to, shared while it outlives a completion's TTL.
#[derive(Clone, Copy)]
struct CompletionLease {
    id: i64,
    /// A completion recorded up to this instant (unix ms) still expires before the lease.
    usable_until_ms: u64,
}

/// What this handle knows of its claims (no etcd lease of their own: they are bound to the
/// session).
#[derive(Default)]
struct Calls {
    /// The calls still claiming (an attempt may have written unacknowledged), by the
    /// call's identity, with their key and when their last attempt failed (`None`: one is
    /// under way): what `abandon` and housekeeping look for.
    claiming: HashMap<ClaimId, (Vec<u8>, Option<Instant>)>,
    /// The acquired claims, by key and token (claims of different keys made in one
    /// transaction share its revision): the session lease they are bound to, and when they
    /// were last renewed (or acquired).
    held: HashMap<(Vec<u8>, ClaimToken), Held>,
}

struct Held {
    lease: i64,
    renewed: Instant,
}

/// Claims to delete: (key, token) held but not renewed, (key, call) of calls that gave up.
type Stale = (Vec<(Vec<u8>, ClaimToken)>, Vec<(Vec<u8>, ClaimId)>);

impl Calls {
    /// What nobody has kept for `lease`: held claims not renewed (their owner's completion
    /// and release both failed), calls whose last attempt failed and were neither retried
    /// nor successfully abandoned. The session outlives them; their keys must not stay
    /// IN_PROGRESS while it does.
    fn stale(&self, lease: Duration) -> Stale {
        let old = |since: &Instant| since.elapsed() > lease;
        let orphans = self
            .held
            .iter()
            .filter(|(_, held)| old(&held.renewed))
            .map(|(claim, _)| claim.clone())
            .collect();
        let gave_up = self
            .claiming
            .iter()
            .filter(|(_, (_, failed))| failed.as_ref().is_some_and(old))
            .map(|(id, (key, _))| (key.clone(), *id))
            .collect();
        (orphans, gave_up)
    }
}

impl EtcdIdempotencyStore {
    /// `lease`: `idempotency_lease` (the session's TTL); `ttl`: `idempotency_ttl`.
    pub fn new(etcd: Arc<EtcdClient>, lease: Duration, ttl: Duration) -> Self {
        EtcdIdempotencyStore {
            session: etcd.session(lease),
            etcd,
            lease,
            ttl,
            completions: Arc::new(Completions::default()),
            calls: Arc::new(Mutex::new(Calls::default())),
        }
    }

    /// For tests: this host stalls (nothing renews its session in the background, so its
    /// claims lapse with it unless renewed by calls) or resumes. Its client's other stores
    /// stall with it.
    #[doc(hidden)]
    pub fn stall_session(&self, stalled: bool) {
        self.etcd.stall_sessions(stalled);
    }
}

/// A stored record as read back: for a claim, the call that wrote it (`None`: written by
/// an earlier build, never ours) and its token, the key's `mod_revision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    owner: Option<ClaimId>,
    record: KeyRecord,
}

/// A record's first byte: its kind and the layout's version.
const CLAIMED: u8 = b'c';
const COMPLETED: u8 = b'd';
/// The layout of earlier builds: the same fields, the token field holding the claim's
/// lease ID (not a fencing token).
const CLAIMED_BY_LEASE: u8 = b'C';
const COMPLETED_BY_LEASE: u8 = b'D';
/// Kind, claim id (claim) or token (completion), fingerprint, then lease-until (claim) or
/// result and expiry (completion); integers big-endian.
const CLAIM_LEN: usize = 1 + 8 + 32 + 8;
const COMPLETION_LEN: usize = 1 + 8 + 32 + 4 + 8;

/// The value of a claim by the call `id`.
fn encode_claim(id: ClaimId, fingerprint: &Fingerprint, lease_until_ms: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(CLAIM_LEN);
    value.push(CLAIMED);
    value.extend_from_slice(&id.0.to_be_bytes());
    value.extend_from_slice(fingerprint);
    value.extend_from_slice(&lease_until_ms.to_be_bytes());
    value
}

/// The value of a completion by the claim `token` (its revision).
fn encode_completion(
    token: ClaimToken,
    fingerprint: &Fingerprint,
    result: i32,
    expires_at_ms: u64,
) -> Vec<u8> {
    let mut value = Vec::with_capacity(COMPLETION_LEN);
    value.push(COMPLETED);
    value.extend_from_slice(&token.0.to_be_bytes());
    value.extend_from_slice(fingerprint);
    value.extend_from_slice(&result.to_be_bytes());
    value.extend_from_slice(&expires_at_ms.to_be_bytes());
    value
}

/// The record a key-value of `<prefix>i/` holds, as a range read returns it (for the
/// operator's command line, docs/C_API.md §11). A claim's `lease_until_ms` is as stored:
/// what is left of it is its etcd lease's time to live.
pub fn record_of(kv: &KeyValue) -> Result<KeyRecord, Failure> {
    decode(kv).map(|stored| stored.record)
}

fn decode(kv: &KeyValue) -> Result<Stored, Failure> {
    decode_value(kv.key(), kv.value(), kv.mod_revision())
}

/// `mod_revision`: the key's, the token of the claim it holds.
fn decode_value(key: &[u8], value: &[u8], mod_revision: i64) -> Result<Stored, Failure> {
    let parse = || -> Option<Stored> {
        let u64_at = |at: usize| Some(u64::from_be_bytes(value.get(at..at + 8)?.try_into().ok()?));
        let field = u64_at(1)?;
        let fingerprint: Fingerprint = value.get(9..41)?.try_into().ok()?;
        let claim_token = ClaimToken(u64::try_from(mod_revision).ok()?);
        let (owner, state) = match (value.first()?, value.len()) {
            (&(CLAIMED | CLAIMED_BY_LEASE), CLAIM_LEN) => (
                // A lease ID in the field: an identity that is never a call's.
                (value[0] == CLAIMED).then_some(ClaimId(field)),
                KeyState::Claimed {
                    token: claim_token,
                    lease_until_ms: u64_at(41)?,
                },
            ),
            (&(COMPLETED | COMPLETED_BY_LEASE), COMPLETION_LEN) => (
                None,
                KeyState::Completed {
                    // A lease ID is no fencing token: 0, "kept no token".
                    token: ClaimToken(if value[0] == COMPLETED { field } else { 0 }),
                    result: i32::from_be_bytes(value.get(41..45)?.try_into().ok()?),
                    expires_at_ms: u64_at(45)?,
                },
            ),
            _ => return None,
        };
        Some(Stored {
            owner,
            record: KeyRecord { fingerprint, state },
        })
    };
    parse().ok_or_else(|| {
        Failure::Corruption(format!(
            "etcd key {} does not hold an idempotency record",
            String::from_utf8_lossy(key)
        ))
    })
}

/// The record as the decision table of C_API §8 must see it: etcd keeps a claim only while
/// its lease lives, so a claim found is live whatever lease-until its value says (the
/// value is not rewritten by renewals).
fn as_found(stored: &Stored) -> KeyRecord {
    let mut record = stored.record;
    if let KeyState::Claimed { lease_until_ms, .. } = &mut record.state {
        *lease_until_ms = u64::MAX;
    }
    record
}

fn lease_ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

fn gave_up(key: &[u8]) -> Failure {
    Failure::InProgress(format!(
        "key {} kept changing under other callers",
        display_key(key)
    ))
}

/// The token of a claim applied at `revision` (never 0: etcd's revisions start at 1).
fn token_of(revision: i64) -> Result<ClaimToken, Failure> {
    match u64::try_from(revision) {
        Ok(revision) if revision > 0 => Ok(ClaimToken(revision)),
        _ => Err(Failure::etcd(
            ErrorCode::Unknown,
            format!("etcd applied a claim but answered no revision ({revision})"),
        )),
    }
}

impl IdempotencyStore for EtcdIdempotencyStore {
    fn claim_as(
        &self,
        key: &[u8],
        fingerprint: &Fingerprint,
        now_ms: u64,
        id: ClaimId,
    ) -> Result<Claim, Failure> {
        // The lease keeper's view of the claim starts before this call (docs/C_API.md
        // §8.1): an acquired claim is vouched for by a keep-alive of its session sent no
        // earlier than now.
        let since = Instant::now();
        let (lease, raw_key, fingerprint) = (self.lease, key.to_vec(), *fingerprint);
        let (session, calls) = (self.session.clone(), self.calls.clone());
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            let claimed = match session.lease(&conn).await {
                Ok(bound) => {
                    calls.lock().claiming.insert(id, (raw_key.clone(), None));
                    let claim = Attempt {
                        conn: &conn,
                        session: &session,
                        calls: &calls,
                        key: &key,
                        raw_key: &raw_key,
                        id,
                        fingerprint: &fingerprint,
                        now_ms,
                        lease,
                        since,
                    };
                    let claimed = claim.acquire(bound).await;
                    if let Some((_, failed)) = calls.lock().claiming.get_mut(&id) {
                        // Kept for the call's retry or `abandon` (an attempt may have
                        // applied unacknowledged), and for housekeeping once it is neither.
                        *failed = Some(Instant::now());
                    }
                    claimed
                }
                Err(failure) => Err(failure),
            };
            match claimed {
                Ok(claim) => Ok(claim),
                Err(failure) => answer_without_writing(&conn, &key, &fingerprint, now_ms, failure)
                    .await
                    .map_err(|f| with_key(f, &raw_key)),
            }
        })
    }

    fn renew(&self, claims: &[(Vec<u8>, ClaimToken)], _now_ms: u64) -> Result<Lapsed, Failure> {
        // One acknowledged keep-alive of the session, sent no earlier than now, renews
        // every claim bound to it (docs/C_API.md §8.1: Ok only once etcd extended it).
        let since = Instant::now();
        let claims = claims.to_vec();
        let (session, calls) = (self.session.clone(), self.calls.clone());
        self.etcd.run(move |conn| async move {
            let mut lapsed = Vec::new();
            let mut by_lease: Vec<(i64, Lapsed)> = Vec::new();
            {
                let calls = calls.lock();
                for claim in claims {
                    match calls.held.get(&claim) {
                        // Completed, released, or never this handle's: not held here.
                        None => lapsed.push(claim),
                        Some(held) => match by_lease.iter_mut().find(|(l, _)| *l == held.lease) {
                            Some((_, claims)) => claims.push(claim),
                            None => by_lease.push((held.lease, vec![claim])),
                        },
                    }
                }
            }
            for (lease, claims) in by_lease {
                // A lease that is gone took its claims with it: nothing else deletes a
                // live claim (release is the owner's).
                let alive = session.renewed_since(&conn, lease, since).await?;
                let mut calls = calls.lock();
                for claim in claims {
                    if alive {
                        if let Some(held) = calls.held.get_mut(&claim) {
                            held.renewed = held.renewed.max(since);
                        }
                    } else {
                        calls.held.remove(&claim);
                        lapsed.push(claim);
                    }
                }
            }
            Ok(lapsed)
        })
    }

    fn complete(
        &self,
        key: &[u8],
        token: ClaimToken,
        fingerprint: &Fingerprint,
        result: i32,
        now_ms: u64,
    ) -> Result<Completion, Failure> {
        let (ttl, raw_key, fingerprint) = (self.ttl, key.to_vec(), *fingerprint);
        let completions = self.completions.clone();
        let calls = self.calls.clone();
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            let value = encode_completion(
                token,
                &fingerprint,
                result,
                now_ms.saturating_add(lease_ms(ttl)),
            );
            let outcome = complete(&conn, &completions, &key, token, value, now_ms, ttl).await;
            if outcome.is_ok() {
                // The key is bound to the completion lease now (or was never ours).
                calls.lock().held.remove(&(raw_key.clone(), token));
            }
            outcome.map_err(|f| with_key(f, &raw_key))
        })
    }

    /// Deletes what the call's attempts may have written unacknowledged (a claim holding
    /// its identity), instead of leaving the key IN_PROGRESS while the session lives.
    fn abandon(&self, key: &[u8], id: ClaimId) {
        if !self.calls.lock().claiming.contains_key(&id) {
            return;
        }
        let raw_key = key.to_vec();
        let dropped = self
            .etcd
            .run(move |conn| async move { drop_unacknowledged(&conn, &raw_key, id).await });
        match dropped {
            Ok(()) => {
                self.calls.lock().claiming.remove(&id);
            }
            // Kept: housekeeping tries again a lease later.
            Err(failure) => {
                tracing::warn!(key = %display_key(key), reason = %failure.detail(), "abandoned claim not deleted yet; housekeeping deletes it later")
            }
        }
    }

    fn release(&self, key: &[u8], token: ClaimToken) -> Result<(), Failure> {
        let raw_key = key.to_vec();
        let calls = self.calls.clone();
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            // Deleted only while the key holds this claim: a taker's claim has its own
            // revision. One compare-and-delete; the session lease stays.
            let when = Compare::mod_revision(key.clone(), CompareOp::Equal, token.0 as i64);
            let deleted = conn
                .txn_or_get(
                    "release a claim",
                    &key,
                    when,
                    vec![TxnOp::delete(key.clone(), None)],
                )
                .await;
            if deleted.is_ok() {
                calls.lock().held.remove(&(raw_key.clone(), token));
            }
            deleted.map(|_| ()).map_err(|f| with_key(f, &raw_key))
        })
    }

    /// Deletes the claims nobody keeps any more ([`Calls::stale`]), each compared on its
    /// revision or its call's identity.
    fn maintain(&self, _now_ms: u64) -> Result<(), Failure> {
        let (orphans, gave_up) = self.calls.lock().stale(self.lease);
        for (key, token) in orphans {
            self.release(&key, token)?;
        }
        for (key, id) in gave_up {
            let raw_key = key.clone();
            self.etcd
                .run(move |conn| async move { drop_unacknowledged(&conn, &raw_key, id).await })?;
            let mut calls = self.calls.lock();
            // Unless the call tried again meanwhile.
            if calls
                .claiming
                .get(&id)
                .is_some_and(|(_, failed)| failed.is_some())
            {
                calls.claiming.remove(&id);
            }
        }
        Ok(())
    }

    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<KeyRecord>, Failure> {
        let raw_key = key.to_vec();
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            let Some(kv) = conn.get("read an idempotency key", &key).await? else {
                return Ok(None);
            };
            let stored = decode(&kv)?;
            match stored.record.state {
                KeyState::Claimed { token, .. } => {
                    let left = conn
                        .time_to_live("read a claim's lease", kv.lease())
                        .await?;
                    Ok(left.map(|seconds| KeyRecord {
                        fingerprint: stored.record.fingerprint,
                        state: KeyState::Claimed {
                            token,
                            lease_until_ms: now_ms.saturating_add(seconds * 1000),
                        },
                    }))
                }
                KeyState::Completed { expires_at_ms, .. } => {
                    Ok((now_ms < expires_at_ms).then_some(stored.record))
                }
            }
        })
    }

    fn forget(&self, key: &[u8], now_ms: u64) -> Result<Forgotten, Failure> {
        let raw_key = key.to_vec();
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            let mut found = conn.get("read an idempotency key", &key).await?;
            for _ in 0..MAX_ROUNDS {
                let Some(kv) = found else {
                    return Ok(Forgotten::Absent);
                };
                let stored = decode(&kv)?;
                if let KeyState::Claimed { .. } = stored.record.state {
                    // etcd keeps a claim only while its lease lives.
                    return Ok(Forgotten::InProgress);
                }
                let live = stored.record.is_live(now_ms);
                let when = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
                match conn
                    .txn_or_get(
                        "forget an idempotency key",
                        &key,
                        when,
                        vec![TxnOp::delete(key.clone(), None)],
                    )
                    .await?
                {
                    TxnOutcome::Applied { .. } => {
                        return Ok(if live {
                            Forgotten::Removed
                        } else {
                            Forgotten::Absent
                        })
                    }
                    TxnOutcome::Found(now) => found = now,
                    TxnOutcome::LeaseGone => found = None,
                }
            }
            Err(gave_up(&raw_key))
        })
    }
}

fn with_key(failure: Failure, key: &[u8]) -> Failure {
    failure.context(format!(" (idempotency key {})", display_key(key)))
}

/// A full cluster (its NOSPACE alarm raised) refuses every write, lease grants included,
/// but a key completed or claimed by another caller needs none: it still replays, conflicts
/// or is in progress (C_API §8's table, [`decide`]). Otherwise, and for any other failure,
/// the claim fails as it did.
async fn answer_without_writing(
    conn: &Conn,
    key: &[u8],
    fingerprint: &Fingerprint,
    now_ms: u64,
    failure: Failure,
) -> Result<Claim, Failure> {
    if failure.kind() != ErrorCode::DiskFull {
        return Err(failure);
    }
    let Ok(Some(kv)) = conn.get("read an idempotency key", key).await else {
        return Err(failure);
    };
    let found = as_found(&decode(&kv)?);
    match decide(Some(&found), fingerprint, now_ms, ClaimToken(0)) {
        // Acquiring it would need a write.
        Claim::Acquired { .. } => Err(failure),
        answer => Ok(answer),
    }
}

/// One call's claim of a key.
struct Attempt<'a> {
    conn: &'a Arc<Conn>,
    session: &'a Arc<Session>,
    calls: &'a Mutex<Calls>,
    key: &'a [u8],
    raw_key: &'a [u8],
    id: ClaimId,
    fingerprint: &'a Fingerprint,
    now_ms: u64,
    lease: Duration,
    since: Instant,
}

impl Attempt<'_> {
    /// The claim, bound to the session lease `bound` (or a new session's), an acquired one
    /// vouched for by a keep-alive of its session sent no earlier than `since` (sent
    /// alongside the transaction, not after it) and noted as held.
    async fn acquire(&self, mut bound: i64) -> Result<Claim, Failure> {
        let (conn, session) = (self.conn, self.session);
        for _ in 0..MAX_ROUNDS {
            let renewing = bound;
            let (claimed, renewed) = tokio::join!(
                claim(
                    conn,
                    session,
                    self.key,
                    self.id,
                    &mut bound,
                    self.fingerprint,
                    self.now_ms,
                    self.lease
                ),
                session.renewed_since(conn, renewing, self.since)
            );
            let (claim, on) = claimed?;
            let Claim::Acquired { token, .. } = claim else {
                // Nothing of this call is on the key.
                self.calls.lock().claiming.remove(&self.id);
                return Ok(claim);
            };
            // Bound to another lease than the one renewed alongside (a new session, or an
            // earlier attempt's found as ours): vouched for on its own.
            let renewed = match renewed {
                Ok(true) if on == renewing => true,
                _ => session.renewed_since(conn, on, self.since).await?,
            };
            if renewed {
                let mut calls = self.calls.lock();
                calls.claiming.remove(&self.id);
                calls.held.insert(
                    (self.raw_key.to_vec(), token),
                    Held {
                        lease: on,
                        renewed: self.since,
                    },
                );
                return Ok(claim);
            }
            // The session lapsed, and the claim with it: claimed again under a new one.
            bound = session.lease(conn).await?;
        }
        Err(gave_up(self.raw_key))
    }
}

/// Deletes the claim of the call `id` on `raw_key`, if the key holds one: compared on its
/// revision, so that nothing else is touched.
async fn drop_unacknowledged(conn: &Conn, raw_key: &[u8], id: ClaimId) -> Result<(), Failure> {
    let key = conn.key64("i", raw_key);
    let Some(kv) = conn.get("read an abandoned claim", &key).await? else {
        return Ok(());
    };
    if decode(&kv)?.owner != Some(id) {
        return Ok(());
    }
    let when = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
    conn.txn_or_get(
        "delete an abandoned claim",
        &key,
        when,
        vec![TxnOp::delete(key.clone(), None)],
    )
    .await
    .map(|_| ())
}

/// The claim's transaction, repeated while the key changes under us: the answer, and the
/// lease the claim is bound to when acquired. `lease` is the session's lease the claim is
/// put with; replaced by a new session's if it was found gone.
#[allow(clippy::too_many_arguments)]
async fn claim(
    conn: &Arc<Conn>,
    session: &Arc<Session>,
    key: &[u8],
    id: ClaimId,
    lease: &mut i64,
    fingerprint: &Fingerprint,
    now_ms: u64,
    ttl: Duration,
) -> Result<(Claim, i64), Failure> {
    let value = encode_claim(id, fingerprint, now_ms.saturating_add(lease_ms(ttl)));
    // Absent is revision 0: a fresh key is claimed in one round trip.
    let mut expected_revision = 0;
    // The first attempt goes with other callers' writes (`super::batch`): the claims of
    // one transaction share its revision, which is fine, since tokens only grow per key
    // (docs/C_API.md §8.1) and this store and the lease keeper hold a claim by its key
    // and token. A retry goes alone.
    let mut together = true;
    for _ in 0..MAX_ROUNDS {
        let put = TxnOp::put(
            key.to_vec(),
            value.clone(),
            Some(PutOptions::new().with_lease(*lease)),
        );
        let outcome = if std::mem::take(&mut together) {
            match conn.write_batched(key, expected_revision, put).await? {
                Some(outcome) => outcome,
                None => continue,
            }
        } else {
            let when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, expected_revision);
            conn.txn_or_get("claim an idempotency key", key, when, vec![put])
                .await?
        };
        let kv = match outcome {
            // docs/C_API.md §8.1: the token is the claim's revision.
            TxnOutcome::Applied { revision } => {
                let token = token_of(revision)?;
                return Ok((
                    Claim::Acquired {
                        token,
                        taken_over: false,
                    },
                    *lease,
                ));
            }
            TxnOutcome::LeaseGone => {
                session.lapsed(*lease);
                *lease = session.lease(conn).await?;
                continue;
            }
            TxnOutcome::Found(None) => {
                expected_revision = 0;
                continue;
            }
            TxnOutcome::Found(Some(kv)) => kv,
        };
        let stored = decode(&kv)?;
        if let (Some(owner), KeyState::Claimed { token, .. }) = (stored.owner, stored.record.state)
        {
            if owner == id {
                // An earlier attempt of this call whose answer was lost did apply.
                crate::metrics::store().unknown_outcomes.inc();
                return Ok((
                    Claim::Acquired {
                        token,
                        taken_over: false,
                    },
                    kv.lease(),
                ));
            }
        }
        match decide(Some(&as_found(&stored)), fingerprint, now_ms, ClaimToken(0)) {
            // An expired completion, not yet deleted by its lease: claimed over, compared
            // on its revision.
            Claim::Acquired { .. } => expected_revision = kv.mod_revision(),
            answer => return Ok((answer, *lease)),
        }
    }
    Err(gave_up(key))
}

async fn complete(
    conn: &Arc<Conn>,
    completions: &Completions,
    key: &[u8],
    token: ClaimToken,
    value: Vec<u8>,
    now_ms: u64,
    ttl: Duration,
) -> Result<Completion, Failure> {
    // First: our claim is still the key's (its revision is the token).
    let mut expected = token.0 as i64;
    // The first attempt goes with other callers' writes (`super::batch`); a retry alone.
    let mut together = true;
    for _ in 0..MAX_ROUNDS {
        let lease = completion_lease(conn, completions, now_ms, ttl).await?;
        let put = TxnOp::put(
            key.to_vec(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        );
        let outcome = if std::mem::take(&mut together) {
            match conn.write_batched(key, expected, put).await? {
                Some(outcome) => outcome,
                None => continue,
            }
        } else {
            let when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, expected);
            conn.txn_or_get("record a completion", key, when, vec![put])
                .await?
        };
        let kv = match outcome {
            TxnOutcome::Applied { .. } => return Ok(Completion::Recorded),
            TxnOutcome::LeaseGone => {
                let mut cached = completions.current.lock();
                if cached.is_some_and(|c| c.id == lease) {
                    *cached = None;
                }
                continue;
            }
            // The key is free (our lease lapsed and nobody took over): record it.
            TxnOutcome::Found(None) => {
                expected = 0;
                continue;
            }
            TxnOutcome::Found(Some(kv)) => kv,
        };
        match decode(&kv)?.record.state {
            // An earlier attempt whose answer was lost did apply.
            KeyState::Completed { token: done, .. } if done == token => {
                crate::metrics::store().unknown_outcomes.inc();
                return Ok(Completion::Recorded);
            }
            KeyState::Completed { expires_at_ms, .. } if now_ms >= expires_at_ms => {
                expected = kv.mod_revision();
            }
            // Another caller's live claim (etcd keeps claims only while their lease lives;
            // ours would have matched the compare) or live completion: never overwritten.
            _ => return Ok(Completion::Superseded),
        }
    }
    Err(gave_up(key))
}

/// The shared completion lease, granted anew once a completion recorded now could outlive
/// it. Its TTL is `ttl` plus a slack, so completions are deleted at most that much late.
async fn completion_lease(
    conn: &Conn,
    completions: &Completions,
    now_ms: u64,
    ttl: Duration,
) -> Result<i64, Failure> {
    let usable = || {
        completions
            .current
            .lock()
            .filter(|lease| now_ms <= lease.usable_until_ms)
            .map(|lease| lease.id)
    };
    if let Some(id) = usable() {
        return Ok(id);
    }
    let _turn = completions.granting.lock().await;
    if let Some(id) = usable() {
        return Ok(id);
    }
    let slack = (ttl / 16).max(Duration::from_secs(3));
    let id = conn.grant("grant a completion lease", ttl + slack).await?;
    // One second of margin for the grant's latency and the rounding of the TTL.
    let usable_until_ms = now_ms + lease_ms(slack).saturating_sub(1000);
    *completions.current.lock() = Some(CompletionLease {
        id,
        usable_until_ms,
    });
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    const FP: Fingerprint = [0xab; 32];

    fn bad(value: &[u8]) {
        let err = decode_value(b"k", value, 7).unwrap_err();
        assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
    }

    #[test]
    fn a_claim_holds_its_calls_identity_and_its_token_is_the_keys_revision() {
        let id = ClaimId(0x1234_5678_9abc_def0);
        let value = encode_claim(id, &FP, 1_700_000_090_000);
        assert_eq!(value.len(), CLAIM_LEN);
        assert_eq!(value[0], CLAIMED);
        let stored = decode_value(b"k", &value, 42).unwrap();
        assert_eq!(stored.owner, Some(id));
        assert_eq!(
            stored.record,
            KeyRecord {
                fingerprint: FP,
                state: KeyState::Claimed {
                    token: ClaimToken(42),
                    lease_until_ms: 1_700_000_090_000,
                },
            }
        );
        // Renewals change no revision; a new claim (a new put) has a greater one.
        let later = decode_value(b"k", &value, 43).unwrap();
        assert!(
            matches!(later.record.state, KeyState::Claimed { token, .. } if token == ClaimToken(43))
        );
    }

    #[test]
    fn a_completion_holds_the_token_of_the_claim_that_completed_it() {
        let value = encode_completion(ClaimToken(42), &FP, -6, 99);
        assert_eq!(value.len(), COMPLETION_LEN);
        let stored = decode_value(b"k", &value, 57).unwrap();
        assert_eq!(stored.owner, None);
        assert_eq!(
            stored.record.state,
            KeyState::Completed {
                token: ClaimToken(42),
                result: -6,
                expires_at_ms: 99,
            }
        );
    }

    #[test]
    fn records_of_the_earlier_layout_are_read_and_never_taken_for_ours() {
        // What earlier builds wrote: the claim's lease ID where the identity is now.
        let lease_id: u64 = 0x7a3f_0000_0001;
        let mut claim = encode_claim(ClaimId(lease_id), &FP, 5);
        claim[0] = CLAIMED_BY_LEASE;
        let stored = decode_value(b"k", &claim, 9).unwrap();
        assert_eq!(stored.owner, None, "an ID that is never a call's");
        assert!(
            matches!(stored.record.state, KeyState::Claimed { token, .. } if token == ClaimToken(9))
        );
        let mut done = encode_completion(ClaimToken(lease_id), &FP, 0, 99);
        done[0] = COMPLETED_BY_LEASE;
        let stored = decode_value(b"k", &done, 9).unwrap();
        assert!(
            matches!(stored.record.state, KeyState::Completed { token, .. } if token == ClaimToken(0)),
            "a lease ID is no fencing token"
        );
    }

    #[test]
    fn malformed_records_are_corruption() {
        for value in [
            encode_claim(ClaimId(1), &FP, 5),
            encode_completion(ClaimToken(3), &FP, 0, 9),
        ] {
            // Cut short or too long: not a record.
            bad(&value[..value.len() - 1]);
            bad(&[value.clone(), vec![0]].concat());
        }
        // The text form of earlier builds (another key space) is not taken for a record.
        bad(b"c 5 ab 99");
        bad(b"");
    }

    #[test]
    fn a_claim_found_is_live_whatever_its_value_says() {
        // The value's lease-until is the claim's first; renewals do not rewrite it.
        let stored = decode_value(b"k", &encode_claim(ClaimId(1), &FP, 5), 8).unwrap();
        let now = 1_000;
        assert_eq!(
            decide(Some(&as_found(&stored)), &FP, now, ClaimToken(0)),
            Claim::InProgress
        );
        assert_eq!(
            decide(Some(&as_found(&stored)), &[0; 32], now, ClaimToken(0)),
            Claim::Conflict
        );
        // An expired completion not yet deleted is claimed over.
        let done = decode_value(b"k", &encode_completion(ClaimToken(8), &FP, 0, 999), 9).unwrap();
        assert!(matches!(
            decide(Some(&as_found(&done)), &FP, now, ClaimToken(0)),
            Claim::Acquired { .. }
        ));
    }
}
