//! Idempotency keys (ABI §8) on etcd (§9).
//!
//! A key lives at `<prefix>i/<base64url of the key>`. A claim is one transaction, compared
//! on the key's revision, that puts a claim record (token, fingerprint, lease until) bound to
//! a fresh etcd lease of `idempotency_lease`; the lease ID is the claim's token. The owner's lease
//! keeper renews it while the operation runs, so a dead or stalled host's claim vanishes
//! when its lease expires. Completion is compared on the key's lease (still our claim) or
//! on its revision (the key free), and puts a completion record (token, fingerprint, result,
//! expiry) bound to a shared lease of `idempotency_ttl` plus a little: etcd deletes completions
//! soon after they expire, so its space stays bounded by the live keys. Release revokes
//! the claim's lease, which deletes the key only while the claim is still ours.
//!
//! Records are fixed-size binary (49 bytes a claim, 53 a completion; text took about 95):
//! the keys live by the million, and etcd's space is the cluster's quota.

use super::client::{Conn, TxnOutcome};
use super::EtcdClient;
use crate::error::{ErrorCode, Failure};
use crate::idempotency::{
    display_key, Claim, ClaimId, ClaimToken, Completion, Fingerprint, Forgotten, IdempotencyStore,
    KeyRecord, KeyState,
};
use etcd_client::{Compare, CompareOp, KeyValue, PutOptions, TxnOp};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// Rounds of "the key changed under us, look again" before giving up; each round is a
/// real change of the key by another caller.
const MAX_ROUNDS: usize = 32;

pub struct EtcdIdempotencyStore {
    etcd: Arc<EtcdClient>,
    lease: Duration,
    ttl: Duration,
    completions: Arc<Mutex<Option<CompletionLease>>>,
}

/// The lease completions are bound to, shared while it outlives a completion's TTL.
#[derive(Clone, Copy)]
struct CompletionLease {
    id: i64,
    /// A completion recorded up to this instant (unix ms) still expires before the lease.
    usable_until_ms: u64,
}

impl EtcdIdempotencyStore {
    /// `lease`: `idempotency_lease`; `ttl`: `idempotency_ttl`.
    pub fn new(etcd: Arc<EtcdClient>, lease: Duration, ttl: Duration) -> Self {
        EtcdIdempotencyStore {
            etcd,
            lease,
            ttl,
            completions: Arc::new(Mutex::new(None)),
        }
    }
}

/// A stored record, with the token of the claim that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    token: ClaimToken,
    record: KeyRecord,
}

/// A record's first byte: its kind and the format's version.
const CLAIMED: u8 = b'C';
const COMPLETED: u8 = b'D';
/// Kind, token, fingerprint, then lease-until (claim) or result and expiry (completion);
/// integers big-endian.
const CLAIM_LEN: usize = 1 + 8 + 32 + 8;
const COMPLETION_LEN: usize = 1 + 8 + 32 + 4 + 8;

fn encode(stored: &Stored) -> Vec<u8> {
    let Stored { token, record } = stored;
    let mut value = Vec::with_capacity(COMPLETION_LEN);
    let kind = match record.state {
        KeyState::Claimed { .. } => CLAIMED,
        KeyState::Completed { .. } => COMPLETED,
    };
    value.push(kind);
    value.extend_from_slice(&token.0.to_be_bytes());
    value.extend_from_slice(&record.fingerprint);
    match record.state {
        KeyState::Claimed { lease_until_ms, .. } => {
            value.extend_from_slice(&lease_until_ms.to_be_bytes())
        }
        KeyState::Completed {
            result,
            expires_at_ms,
            ..
        } => {
            value.extend_from_slice(&result.to_be_bytes());
            value.extend_from_slice(&expires_at_ms.to_be_bytes());
        }
    }
    value
}

/// The record a key-value of `<prefix>i/` holds, as a range read returns it (for the
/// operator's command line, docs/C_API.md §11). A claim's `lease_until_ms` is as stored:
/// what is left of it is its etcd lease's time to live.
pub fn record_of(kv: &KeyValue) -> Result<KeyRecord, Failure> {
    decode(kv).map(|stored| stored.record)
}

fn decode(kv: &KeyValue) -> Result<Stored, Failure> {
    decode_value(kv.key(), kv.value())
}

fn decode_value(key: &[u8], value: &[u8]) -> Result<Stored, Failure> {
    let parse = || -> Option<Stored> {
        let u64_at = |at: usize| Some(u64::from_be_bytes(value.get(at..at + 8)?.try_into().ok()?));
        let token = ClaimToken(u64_at(1)?);
        let fingerprint: Fingerprint = value.get(9..41)?.try_into().ok()?;
        let state = match (value.first()?, value.len()) {
            (&CLAIMED, CLAIM_LEN) => KeyState::Claimed {
                token,
                lease_until_ms: u64_at(41)?,
            },
            (&COMPLETED, COMPLETION_LEN) => KeyState::Completed {
                token,
                result: i32::from_be_bytes(value.get(41..45)?.try_into().ok()?),
                expires_at_ms: u64_at(45)?,
            },
            _ => return None,
        };
        Some(Stored {
            token,
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

fn lease_ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

fn gave_up(key: &[u8]) -> Failure {
    Failure::InProgress(format!(
        "key {} kept changing under other callers",
        display_key(key)
    ))
}

impl IdempotencyStore for EtcdIdempotencyStore {
    fn claim_as(
        &self,
        key: &[u8],
        fingerprint: &Fingerprint,
        now_ms: u64,
        _id: ClaimId,
    ) -> Result<Claim, Failure> {
        let (lease, raw_key, fingerprint) = (self.lease, key.to_vec(), *fingerprint);
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            let mut token = match conn.grant("grant a claim lease", lease).await {
                Ok(token) => token,
                Err(failure) => {
                    return answer_without_writing(&conn, &key, &fingerprint, now_ms, failure)
                        .await
                        .map_err(|f| with_key(f, &raw_key))
                }
            };
            let outcome = match claim(&conn, &key, &mut token, &fingerprint, now_ms, lease).await {
                Err(failure) => {
                    answer_without_writing(&conn, &key, &fingerprint, now_ms, failure).await
                }
                claimed => claimed,
            };
            if !matches!(outcome, Ok(Claim::Acquired { .. })) {
                // Whatever an unacknowledged attempt may still write dies with its lease.
                let conn = conn.clone();
                tokio::spawn(async move {
                    let _ = conn.revoke("revoke an unused claim lease", token).await;
                });
            }
            outcome.map_err(|f| with_key(f, &raw_key))
        })
    }

    fn renew(
        &self,
        claims: &[(Vec<u8>, ClaimToken)],
        _now_ms: u64,
    ) -> Result<Vec<ClaimToken>, Failure> {
        let tokens: Vec<ClaimToken> = claims.iter().map(|(_, token)| *token).collect();
        self.etcd.run(move |conn| async move {
            let mut lapsed = Vec::new();
            for token in tokens {
                // A lease that is gone is a claim that is no longer ours.
                if !conn
                    .keep_alive("renew a claim lease", token.0 as i64)
                    .await?
                {
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
        self.etcd.run(move |conn| async move {
            let key = conn.key64("i", &raw_key);
            let stored = Stored {
                token,
                record: KeyRecord {
                    fingerprint,
                    state: KeyState::Completed {
                        token,
                        result,
                        expires_at_ms: now_ms.saturating_add(lease_ms(ttl)),
                    },
                },
            };
            let outcome = complete(&conn, &completions, &key, &stored, now_ms, ttl).await;
            if outcome.is_ok() {
                // The key is bound to the completion lease now (or was never ours).
                let conn = conn.clone();
                tokio::spawn(async move {
                    let _ = conn
                        .revoke("revoke a completed claim's lease", token.0 as i64)
                        .await;
                });
            }
            outcome.map_err(|f| with_key(f, &raw_key))
        })
    }

    fn release(&self, key: &[u8], token: ClaimToken) -> Result<(), Failure> {
        let raw_key = key.to_vec();
        // Revoking the claim's lease deletes the key only while it is bound to that lease,
        // i.e. while the claim is still ours: a taker's claim has its own lease.
        self.etcd.run(move |conn| async move {
            conn.revoke("release a claim", token.0 as i64)
                .await
                .map_err(|f| with_key(f, &raw_key))
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
                    TxnOutcome::Applied => {
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
/// or is in progress. Otherwise, and for any other failure, the claim fails as it did.
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
    let stored = decode(&kv)?;
    let same = stored.record.fingerprint == *fingerprint;
    match stored.record.state {
        KeyState::Claimed { .. } if same => Ok(Claim::InProgress),
        KeyState::Claimed { .. } => Ok(Claim::Conflict),
        KeyState::Completed {
            result,
            expires_at_ms,
            ..
        } if now_ms < expires_at_ms => Ok(if same {
            Claim::Replay { result }
        } else {
            Claim::Conflict
        }),
        KeyState::Completed { .. } => Err(failure),
    }
}

/// The claim's transaction, repeated while the key changes under us. `token` is the lease
/// the claim is bound to; replaced if it expired before the claim was written.
async fn claim(
    conn: &Conn,
    key: &[u8],
    token: &mut i64,
    fingerprint: &Fingerprint,
    now_ms: u64,
    lease: Duration,
) -> Result<Claim, Failure> {
    // Absent is revision 0: a fresh key is claimed in one round trip.
    let mut expected_revision = 0;
    for _ in 0..MAX_ROUNDS {
        let ours = ClaimToken(*token as u64);
        let value = encode(&Stored {
            token: ours,
            record: KeyRecord {
                fingerprint: *fingerprint,
                state: KeyState::Claimed {
                    token: ours,
                    lease_until_ms: now_ms.saturating_add(lease_ms(lease)),
                },
            },
        });
        let when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, expected_revision);
        let put = TxnOp::put(
            key.to_vec(),
            value,
            Some(PutOptions::new().with_lease(*token)),
        );
        let kv = match conn
            .txn_or_get("claim an idempotency key", key, when, vec![put])
            .await?
        {
            TxnOutcome::Applied => {
                return Ok(Claim::Acquired {
                    token: ours,
                    taken_over: false,
                })
            }
            TxnOutcome::LeaseGone => {
                *token = conn.grant("grant a claim lease", lease).await?;
                continue;
            }
            TxnOutcome::Found(None) => {
                expected_revision = 0;
                continue;
            }
            TxnOutcome::Found(Some(kv)) => kv,
        };
        let stored = decode(&kv)?;
        if stored.token == ours {
            // An earlier attempt whose answer was lost did apply.
            crate::metrics::store().unknown_outcomes.inc();
            return Ok(Claim::Acquired {
                token: ours,
                taken_over: false,
            });
        }
        let same = stored.record.fingerprint == *fingerprint;
        match stored.record.state {
            // A claim exists only while its owner's lease lives. A mismatch is reported
            // before "in progress".
            KeyState::Claimed { .. } if same => return Ok(Claim::InProgress),
            KeyState::Claimed { .. } => return Ok(Claim::Conflict),
            KeyState::Completed {
                result,
                expires_at_ms,
                ..
            } if now_ms < expires_at_ms => {
                return Ok(if same {
                    Claim::Replay { result }
                } else {
                    Claim::Conflict
                })
            }
            // Expired, not yet deleted by its lease: claimed over, compared on its revision.
            KeyState::Completed { .. } => expected_revision = kv.mod_revision(),
        }
    }
    Err(gave_up(key))
}

async fn complete(
    conn: &Conn,
    completions: &Mutex<Option<CompletionLease>>,
    key: &[u8],
    stored: &Stored,
    now_ms: u64,
    ttl: Duration,
) -> Result<Completion, Failure> {
    let value = encode(stored);
    let token = stored.token;
    // First: our claim is still the key's (its lease is ours).
    let mut when = Compare::lease(key.to_vec(), CompareOp::Equal, token.0 as i64);
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
            TxnOutcome::Applied => return Ok(Completion::Recorded),
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
        let found = decode(&kv)?;
        match found.record.state {
            // An earlier attempt whose answer was lost did apply.
            KeyState::Completed { .. } if found.token == token => {
                crate::metrics::store().unknown_outcomes.inc();
                return Ok(Completion::Recorded);
            }
            KeyState::Completed { expires_at_ms, .. } if now_ms >= expires_at_ms => {
                when = Compare::mod_revision(key.to_vec(), CompareOp::Equal, kv.mod_revision());
            }
            // Another caller's live claim (etcd keeps claims only while their lease lives)
            // or live completion: never overwritten.
            _ if found.token != token => return Ok(Completion::Superseded),
            // Our claim, moved to a new lease between the compare and the read: again.
            _ => when = Compare::lease(key.to_vec(), CompareOp::Equal, kv.lease()),
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

    #[test]
    fn records_round_trip() {
        let claimed = Stored {
            token: ClaimToken(0x7a3f_0000_0001),
            record: KeyRecord {
                fingerprint: [0xab; 32],
                state: KeyState::Claimed {
                    token: ClaimToken(0x7a3f_0000_0001),
                    lease_until_ms: 1_700_000_090_000,
                },
            },
        };
        let done = Stored {
            token: ClaimToken(5),
            record: KeyRecord {
                fingerprint: [1; 32],
                state: KeyState::Completed {
                    token: ClaimToken(5),
                    result: -6,
                    expires_at_ms: 99,
                },
            },
        };
        for stored in [claimed, done] {
            let value = encode(&stored);
            let len = match stored.record.state {
                KeyState::Claimed { .. } => CLAIM_LEN,
                KeyState::Completed { .. } => COMPLETION_LEN,
            };
            assert_eq!(value.len(), len);
            assert_eq!(decode_value(b"k", &value).unwrap(), stored);
            // Cut short or too long: not a record.
            for bad in [
                &value[..value.len() - 1],
                &[value.clone(), vec![0]].concat(),
            ] {
                let err = decode_value(b"k", bad).unwrap_err();
                assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
            }
        }
        // The text form of earlier builds (another key space) is not taken for a record.
        let err = decode_value(b"k", b"c 5 ab 99").unwrap_err();
        assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
    }
}
