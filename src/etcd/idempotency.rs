//! Idempotency keys (ABI §8) on etcd (§9).
//!
//! A key lives at `<prefix>i/<base64url of the key>`. A claim is one transaction, compared
//! on the key's revision, that puts a claim record (the call's [`ClaimId`], fingerprint,
//! lease until) bound to an etcd lease of `idempotency_lease`. The claim's fencing token is
//! the revision of that put (docs/C_API.md §8.1): etcd's revision is cluster-wide and only
//! grows, so every later claim of the key, through any member and from any host, has a
//! greater one; keep-alives do not change it, and read back it is the key's `mod_revision`.
//! The value holds the call's identity rather than the token (the revision is not known
//! before the put): a retry of the same call whose earlier answer was lost finds its own
//! claim and acquires it with that claim's token. The retries of one call reuse one lease,
//! so a lost answer leaves no second lease and no orphaned claim behind.
//!
//! The owner's lease keeper renews the lease while the operation runs, so a dead or
//! stalled host's claim vanishes when its lease expires. Completion is compared on the
//! key's `mod_revision` being the claim's token (still our claim) or on the key being free
//! or expired, and puts a completion record (token, fingerprint, result, expiry) bound to a
//! shared lease of `idempotency_ttl` plus a little: etcd deletes completions soon after
//! they expire, so its space stays bounded by the live keys. Release is one
//! compare-and-delete on the token, then the claim's lease is revoked.
//!
//! Records are fixed-size binary (49 bytes a claim, 53 a completion; text took about 95):
//! the keys live by the million, and etcd's space is the cluster's quota. The first byte
//! names the layout; the layout of earlier builds, whose token field held a lease ID, is
//! still read (such a claim is never ours; its token is its `mod_revision` all the same).

use super::client::{Conn, TxnOutcome};
use super::EtcdClient;
use crate::error::{ErrorCode, Failure};
use crate::idempotency::{
    decide, display_key, Claim, ClaimId, ClaimToken, Completion, Fingerprint, Forgotten,
    IdempotencyStore, KeyRecord, KeyState,
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
    lease: Duration,
    ttl: Duration,
    completions: Arc<Mutex<Option<CompletionLease>>>,
    leases: Arc<Mutex<ClaimLeases>>,
}

/// The lease completions are bound to, shared while it outlives a completion's TTL.
#[derive(Clone, Copy)]
struct CompletionLease {
    id: i64,
    /// A completion recorded up to this instant (unix ms) still expires before the lease.
    usable_until_ms: u64,
}

/// The etcd leases of this handle's claims.
#[derive(Default)]
struct ClaimLeases {
    /// The lease of each call still claiming (its attempts so far unanswered, or not yet
    /// returned), by the call's identity: its retries reuse it. With when it was granted.
    claiming: HashMap<ClaimId, (i64, Instant)>,
    /// The lease of each acquired claim, by token: what renew, complete and release act on.
    /// With when it was last known alive.
    held: HashMap<ClaimToken, (i64, Instant)>,
}

impl ClaimLeases {
    /// Forgets leases that ran out long ago: a call that gave up and was never retried, a
    /// claim whose completion failed and was never renewed again.
    fn prune(&mut self, lease: Duration) {
        let now = Instant::now();
        let old = |since: &Instant| now.saturating_duration_since(*since) > lease * 2;
        self.claiming.retain(|_, (_, since)| !old(since));
        self.held.retain(|_, (_, since)| !old(since));
    }

    fn take_held(&mut self, token: ClaimToken) -> Option<i64> {
        self.held.remove(&token).map(|(lease, _)| lease)
    }
}

impl EtcdIdempotencyStore {
    /// `lease`: `idempotency_lease`; `ttl`: `idempotency_ttl`.
    pub fn new(etcd: Arc<EtcdClient>, lease: Duration, ttl: Duration) -> Self {
        EtcdIdempotencyStore {
            etcd,
            lease,
            ttl,
            completions: Arc::new(Mutex::new(None)),
            leases: Arc::new(Mutex::new(ClaimLeases::default())),
        }
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

/// The record as the decision table of ABI §8 must see it: etcd keeps a claim only while
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

/// Revokes `lease` in the background: nothing waits for it, and a lease left alive ends
/// with its TTL anyway.
fn revoke_later(conn: &Arc<Conn>, what: &'static str, lease: i64) {
    let conn = conn.clone();
    tokio::spawn(async move {
        let _ = conn.revoke(what, lease).await;
    });
}

impl IdempotencyStore for EtcdIdempotencyStore {
    fn claim_as(
        &self,
        key: &[u8],
        fingerprint: &Fingerprint,
        now_ms: u64,
        id: ClaimId,
    ) -> Result<Claim, Failure> {
        let (lease, raw_key, fingerprint) = (self.lease, key.to_vec(), *fingerprint);
        let leases = self.leases.clone();
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            // The lease of this call's earlier attempts, if any: a claim they wrote
            // unacknowledged is bound to it, and is found below as ours.
            let reused = {
                let mut leases = leases.lock();
                leases.prune(lease);
                leases.claiming.get(&id).map(|(l, _)| *l)
            };
            let mut granted = match reused {
                Some(granted) => granted,
                None => {
                    let since = Instant::now();
                    match conn.grant("grant a claim lease", lease).await {
                        Ok(granted) => {
                            leases.lock().claiming.insert(id, (granted, since));
                            granted
                        }
                        Err(failure) => {
                            return answer_without_writing(
                                &conn,
                                &key,
                                &fingerprint,
                                now_ms,
                                failure,
                            )
                            .await
                            .map_err(|f| with_key(f, &raw_key))
                        }
                    }
                }
            };
            let claimed = claim(
                &conn,
                &key,
                id,
                &mut granted,
                &fingerprint,
                now_ms,
                lease,
                &leases,
            )
            .await;
            let outcome = match claimed {
                Ok((claim @ Claim::Acquired { token, .. }, bound)) => {
                    let mut held = leases.lock();
                    held.claiming.remove(&id);
                    held.held.insert(token, (bound, Instant::now()));
                    drop(held);
                    if bound != granted {
                        // Found bound to a lease granted before this handle forgot it.
                        revoke_later(&conn, "revoke an unused claim lease", granted);
                    }
                    return Ok(claim);
                }
                Ok((answer, _)) => {
                    // Nothing of this call is on the key: its lease is not needed.
                    leases.lock().claiming.remove(&id);
                    revoke_later(&conn, "revoke an unused claim lease", granted);
                    Ok(answer)
                }
                // Kept for the call's retry (an attempt may have applied unacknowledged);
                // a call that is not retried leaves a lease that nobody renews, and
                // whatever it may have written ends with it.
                Err(failure) => {
                    answer_without_writing(&conn, &key, &fingerprint, now_ms, failure).await
                }
            };
            outcome.map_err(|f| with_key(f, &raw_key))
        })
    }

    fn renew(
        &self,
        claims: &[(Vec<u8>, ClaimToken)],
        _now_ms: u64,
    ) -> Result<Vec<ClaimToken>, Failure> {
        let tokens: Vec<ClaimToken> = claims.iter().map(|(_, token)| *token).collect();
        let leases = self.leases.clone();
        self.etcd.run(move |conn| async move {
            let mut lapsed = Vec::new();
            for token in tokens {
                let found = leases.lock().held.get(&token).map(|(l, _)| *l);
                let Some(lease) = found else {
                    // Completed, released, or never this handle's: not held here.
                    lapsed.push(token);
                    continue;
                };
                let since = Instant::now();
                // A lease that is gone is a claim that is no longer ours: its key went
                // with it, and nothing else deletes a live claim (release is the owner's).
                if conn.keep_alive("renew a claim lease", lease).await? {
                    if let Some(entry) = leases.lock().held.get_mut(&token) {
                        entry.1 = since;
                    }
                } else {
                    leases.lock().take_held(token);
                    lapsed.push(token);
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
        let leases = self.leases.clone();
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
                if let Some(lease) = leases.lock().take_held(token) {
                    revoke_later(&conn, "revoke a completed claim's lease", lease);
                }
            }
            outcome.map_err(|f| with_key(f, &raw_key))
        })
    }

    /// Revokes the lease of the call's attempts: a claim one of them wrote unacknowledged
    /// is bound to it and goes with it, instead of keeping the key IN_PROGRESS for a lease.
    fn abandon(&self, key: &[u8], id: ClaimId) {
        let Some((lease, _)) = self.leases.lock().claiming.remove(&id) else {
            return;
        };
        let raw_key = key.to_vec();
        let revoked = self.etcd.run(move |conn| async move {
            conn.revoke("revoke an abandoned claim's lease", lease)
                .await
        });
        if let Err(failure) = revoked {
            tracing::warn!(key = %display_key(&raw_key), reason = %failure.detail(), "abandoned claim's lease not revoked; it ends with its lease");
        }
    }

    fn release(&self, key: &[u8], token: ClaimToken) -> Result<(), Failure> {
        let raw_key = key.to_vec();
        let leases = self.leases.clone();
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            // Deleted only while the key holds this claim: a taker's claim has its own
            // revision.
            let when = Compare::mod_revision(key.clone(), CompareOp::Equal, token.0 as i64);
            let deleted = conn
                .txn_or_get(
                    "release a claim",
                    &key,
                    when,
                    vec![TxnOp::delete(key.clone(), None)],
                )
                .await;
            // The lease holds nothing of this claim any more (or the claim ends with it).
            if let Some(lease) = leases.lock().take_held(token) {
                revoke_later(&conn, "revoke a released claim's lease", lease);
            }
            deleted.map(|_| ()).map_err(|f| with_key(f, &raw_key))
        })
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
/// or is in progress (ABI §8's table, [`decide`]). Otherwise, and for any other failure,
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

/// The claim's transaction, repeated while the key changes under us: the answer, and the
/// lease the claim is bound to when acquired. `lease` is the lease the claim is put with;
/// replaced (and noted as the call's) if it expired before the claim was written.
#[allow(clippy::too_many_arguments)]
async fn claim(
    conn: &Conn,
    key: &[u8],
    id: ClaimId,
    lease: &mut i64,
    fingerprint: &Fingerprint,
    now_ms: u64,
    ttl: Duration,
    leases: &Mutex<ClaimLeases>,
) -> Result<(Claim, i64), Failure> {
    let value = encode_claim(id, fingerprint, now_ms.saturating_add(lease_ms(ttl)));
    // Absent is revision 0: a fresh key is claimed in one round trip.
    let mut expected_revision = 0;
    for _ in 0..MAX_ROUNDS {
        let when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, expected_revision);
        let put = TxnOp::put(
            key.to_vec(),
            value.clone(),
            Some(PutOptions::new().with_lease(*lease)),
        );
        let kv = match conn
            .txn_or_get("claim an idempotency key", key, when, vec![put])
            .await?
        {
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
                let since = Instant::now();
                *lease = conn.grant("grant a claim lease", ttl).await?;
                leases.lock().claiming.insert(id, (*lease, since));
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
    conn: &Conn,
    completions: &Mutex<Option<CompletionLease>>,
    key: &[u8],
    token: ClaimToken,
    value: Vec<u8>,
    now_ms: u64,
    ttl: Duration,
) -> Result<Completion, Failure> {
    // First: our claim is still the key's (its revision is the token).
    let mut when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, token.0 as i64);
    for _ in 0..MAX_ROUNDS {
        let lease = completion_lease(conn, completions, now_ms, ttl).await?;
        let put = TxnOp::put(
            key.to_vec(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        );
        let kv = match conn
            .txn_or_get("record a completion", key, when.clone(), vec![put])
            .await?
        {
            TxnOutcome::Applied { .. } => return Ok(Completion::Recorded),
            TxnOutcome::LeaseGone => {
                let mut cached = completions.lock();
                if cached.is_some_and(|c| c.id == lease) {
                    *cached = None;
                }
                continue;
            }
            // The key is free (our lease lapsed and nobody took over): record it.
            TxnOutcome::Found(None) => {
                when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, 0);
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
                when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, kv.mod_revision());
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
    completions: &Mutex<Option<CompletionLease>>,
    now_ms: u64,
    ttl: Duration,
) -> Result<i64, Failure> {
    if let Some(lease) = *completions.lock() {
        if now_ms <= lease.usable_until_ms {
            return Ok(lease.id);
        }
    }
    let slack = (ttl / 16).max(Duration::from_secs(3));
    let id = conn.grant("grant a completion lease", ttl + slack).await?;
    // One second of margin for the grant's latency and the rounding of the TTL.
    let usable_until_ms = now_ms + lease_ms(slack).saturating_sub(1000);
    *completions.lock() = Some(CompletionLease {
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
