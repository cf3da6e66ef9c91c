//! Idempotency keys (C_API §8): an operation keyed by its caller runs once, across threads,
//! processes sharing a `state_dir`, and crashes.
//!
//! The rules live here, apart from storage: [`decide`] says what a call finds a key in,
//! and [`IdempotencyStore`] is the small contract (claim with a lease, renew, complete,
//! release, get, forget) that the embedded [`file_store::FileIdempotencyStore`] implements and a
//! shared database could implement for a cluster of taosX nodes. [`keyed::Keyed`] runs an
//! operation under a key: claim, renew the lease while it runs, then complete or release.

pub mod file_store;
pub mod keyed;
pub mod lease;
pub mod record;

use crate::error::Result;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Longest key, in bytes (C_API §8).
pub const MAX_KEY_BYTES: usize = 255;

/// SHA-256 of the bytes that identify a request's payload.
pub type Fingerprint = [u8; 32];

pub fn fingerprint(payload: &[u8]) -> Fingerprint {
    Sha256::digest(payload).into()
}

/// Bytes of a fingerprint that compact records keep (etcd, docs/C_API.md §9): the first 16
/// of the SHA-256, ample to tell apart two payloads of one key.
pub(crate) const KEPT_FINGERPRINT: usize = 16;

/// `fingerprint` as a compact record keeps it: its first [`KEPT_FINGERPRINT`] bytes, the
/// rest zero.
pub fn kept_fingerprint(fingerprint: &Fingerprint) -> Fingerprint {
    let mut kept = [0; 32];
    kept[..KEPT_FINGERPRINT].copy_from_slice(&fingerprint[..KEPT_FINGERPRINT]);
    kept
}

/// Whether a recorded fingerprint is `given`: whole, or as a compact record keeps it (the
/// rest zero; a whole SHA-256 ending in 16 zero bytes is a chance of 2^-128).
pub fn same_fingerprint(recorded: &Fingerprint, given: &Fingerprint) -> bool {
    recorded == given
        || (recorded[KEPT_FINGERPRINT..].iter().all(|&b| b == 0)
            && recorded[..KEPT_FINGERPRINT] == given[..KEPT_FINGERPRINT])
}

/// The bytes of a recorded fingerprint worth showing: all of it, or those a compact record
/// kept.
pub fn shown_fingerprint(recorded: &Fingerprint) -> &[u8] {
    if recorded[KEPT_FINGERPRINT..].iter().all(|&b| b == 0) {
        &recorded[..KEPT_FINGERPRINT]
    } else {
        recorded
    }
}

/// A claim's fencing token: strictly greater than the token of every earlier claim of the
/// same key, whatever happened between (takeover, release, expiry, forget, restart,
/// compaction, another process or host), and never 0. On the file store it comes from a
/// store-wide counter durable with the claim (see `file_store/tokens.rs`); on etcd it is the
/// claim's revision. Renewing, completing and releasing act only on the claim whose token
/// they carry, so a caller that stalled past its lease can never touch the claim of the
/// caller that took the key over; and the place where the operation's effect lands can
/// refuse the stale owner's late writes by comparing tokens (docs/C_API.md §8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimToken(pub u64);

/// The identity of one call's claim, the same across the retries of that call: a claim
/// whose answer was lost (a timeout after sending) is recognised as the caller's own when
/// it is read back, never taken for another caller's claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimId(pub u64);

impl ClaimId {
    /// A fresh random identity (never 0).
    pub fn new() -> Self {
        ClaimId(fastrand::u64(1..))
    }
}

impl Default for ClaimId {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// The claim `token` runs the operation; after `lease_until_ms` a dead owner's claim
    /// is taken over.
    Claimed {
        token: ClaimToken,
        lease_until_ms: u64,
    },
    /// The claim `token` ran the operation, which succeeded with `result`; replayed until
    /// `expires_at_ms`. (`token` 0: recorded by an earlier build, which kept no token.)
    Completed {
        token: ClaimToken,
        result: i32,
        expires_at_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRecord {
    pub fingerprint: Fingerprint,
    pub state: KeyState,
}

impl KeyRecord {
    /// Whether the record still counts at `now_ms` (a lease or a TTL not run out).
    pub fn is_live(&self, now_ms: u64) -> bool {
        match self.state {
            KeyState::Claimed { lease_until_ms, .. } => now_ms < lease_until_ms,
            KeyState::Completed { expires_at_ms, .. } => now_ms < expires_at_ms,
        }
    }
}

/// What a call finds when it asks for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller owns the key now, as the claim `token`, and runs the operation;
    /// `taken_over`: from an owner whose lease ran out.
    Acquired { token: ClaimToken, taken_over: bool },
    /// Completed earlier with the same fingerprint: return `result` without running.
    Replay { result: i32 },
    /// Another live owner runs it.
    InProgress,
    /// Completed or claimed with a different fingerprint.
    Conflict,
}

/// The decision table of C_API §8. A mismatch is reported before "in progress"; a lease that
/// ran out is taken over whatever its fingerprint; an expired completion is forgotten.
/// `token` is the identity the new claim gets when the key is acquired.
pub fn decide(
    existing: Option<&KeyRecord>,
    fingerprint: &Fingerprint,
    now_ms: u64,
    token: ClaimToken,
) -> Claim {
    let Some(record) = existing else {
        return Claim::Acquired {
            token,
            taken_over: false,
        };
    };
    match (record.state, record.is_live(now_ms)) {
        (KeyState::Claimed { .. }, false) => Claim::Acquired {
            token,
            taken_over: true,
        },
        (KeyState::Completed { .. }, false) => Claim::Acquired {
            token,
            taken_over: false,
        },
        _ if !same_fingerprint(&record.fingerprint, fingerprint) => Claim::Conflict,
        (KeyState::Claimed { .. }, true) => Claim::InProgress,
        (KeyState::Completed { result, .. }, true) => Claim::Replay { result },
    }
}

/// What became of a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Recorded: the key replays its result with the claim's fingerprint.
    Recorded,
    /// Another caller holds a live claim or completion of the key: nothing was written
    /// (the operation's success stands; the key is that caller's).
    Superseded,
}

/// Whether [`IdempotencyStore::complete`] may write over `existing` for the claim `token`:
/// its own claim (lapsed or not), its own completion (a completion retried after its
/// answer was lost), or a free key, take the completion; another caller's live claim or
/// completion is never overwritten.
pub fn completion_allowed(existing: Option<&KeyRecord>, token: ClaimToken, now_ms: u64) -> bool {
    match existing {
        None => true,
        Some(record) if is_claim(Some(record), token) => true,
        Some(KeyRecord {
            state: KeyState::Completed { token: done, .. },
            ..
        }) if *done == token && token.0 != 0 => true,
        Some(record) => !record.is_live(now_ms),
    }
}

/// Whether `existing` is the claim `token` (whatever its lease).
pub fn is_claim(existing: Option<&KeyRecord>, token: ClaimToken) -> bool {
    matches!(existing, Some(KeyRecord { state: KeyState::Claimed { token: current, .. }, .. }) if *current == token)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    Removed,
    /// Nothing was stored under the key.
    Absent,
    /// A live owner runs it: kept.
    InProgress,
}

/// The claims (key, token) that [`IdempotencyStore::renew`] did not renew.
pub type Lapsed = Vec<(Vec<u8>, ClaimToken)>;

/// Where idempotency records live. Every method is atomic with respect to other callers
/// of the same store, in this process and in others sharing it; a method that returns
/// `Ok` after writing has made the write durable.
pub trait IdempotencyStore: Send + Sync {
    /// Decides on `key` as [`decide`] does and, when acquired, records a claim with a
    /// fresh [`ClaimToken`] (greater than every earlier claim's of the key) and a lease
    /// until `now_ms + lease`. Durable before it returns, and it reserves the room the
    /// key's completion needs: a claim that cannot be recorded is an error, and the
    /// operation must not run. `id` is the claim's identity across the retries of one
    /// call: a claim of `id` found already recorded (an earlier attempt whose answer was
    /// lost) is acquired as it stands, with its token.
    fn claim_as(
        &self,
        key: &[u8],
        fingerprint: &Fingerprint,
        now_ms: u64,
        id: ClaimId,
    ) -> Result<Claim>;

    /// The call `id` gave up claiming `key` (its attempts failed): whatever an attempt may
    /// have written unacknowledged is let go now rather than when its lease runs out, so that
    /// it does not keep the key IN_PROGRESS for others. Best effort; nothing to do for a
    /// store whose claims are acknowledged or fail as a whole.
    fn abandon(&self, _key: &[u8], _id: ClaimId) {}

    /// How long ago the renewal that vouches for the acquired claim `(key, token)` was
    /// sent, for a store whose claims share a lease renewed before them (etcd's session):
    /// the holder's view of the claim (docs/C_API.md §8.1) counts from then, not from the
    /// claim's own sending. `None`: from the claim's sending, its lease starting with it.
    fn vouched_ago(&self, _key: &[u8], _token: ClaimToken) -> Option<Duration> {
        None
    }

    /// [`Self::claim_as`] with an identity of its own (a call that is not retried).
    fn claim(&self, key: &[u8], fingerprint: &Fingerprint, now_ms: u64) -> Result<Claim> {
        self.claim_as(key, fingerprint, now_ms, ClaimId::new())
    }

    /// Extends to `now_ms + lease` the leases of those claims (key, token) that are still
    /// current (the key still holds that token); returns the others, which were not renewed
    /// (taken over, released, or their lease ran out). A claim is its key and token: claims
    /// of different keys may share a token (docs/C_API.md §8.1 orders tokens per key).
    fn renew(&self, claims: &[(Vec<u8>, ClaimToken)], now_ms: u64) -> Result<Lapsed>;

    /// Records the success of the claim `token` with `fingerprint` (the claim's own),
    /// replayed until `now_ms + ttl`, when [`completion_allowed`] says so; otherwise
    /// writes nothing and returns [`Completion::Superseded`].
    fn complete(
        &self,
        key: &[u8],
        token: ClaimToken,
        fingerprint: &Fingerprint,
        result: i32,
        now_ms: u64,
    ) -> Result<Completion>;

    /// Drops the claim `token` of `key` if it is still the key's claim (the operation
    /// failed; a later call may try); otherwise changes nothing.
    fn release(&self, key: &[u8], token: ClaimToken) -> Result<()>;

    /// The live record of `key`, if any.
    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<KeyRecord>>;

    /// Drops a completed or abandoned key, so that its operation may run again. A key
    /// that a live owner is running is not dropped.
    fn forget(&self, key: &[u8], now_ms: u64) -> Result<Forgotten>;

    /// Housekeeping (dropping expired records); called from time to time, off the callers' path.
    fn maintain(&self, _now_ms: u64) -> Result<()> {
        Ok(())
    }

    /// Whether housekeeping should run now rather than at its next regular time.
    fn maintenance_due(&self) -> bool {
        false
    }

    /// About how long one round of housekeeping could take now (a compaction of every live
    /// key): a lease shorter than this is warned about at start-up.
    fn maintenance_estimate(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// A key as it can be shown in a message: escaped, and cut after 64 bytes.
pub fn display_key(key: &[u8]) -> String {
    let shown: String = key
        .iter()
        .take(64)
        .flat_map(|b| b.escape_ascii())
        .map(char::from)
        .collect();
    if key.len() > 64 {
        format!("\"{shown}\"... ({} bytes)", key.len())
    } else {
        format!("\"{shown}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Fingerprint = [1; 32];
    const B: Fingerprint = [2; 32];

    const T: ClaimToken = ClaimToken(9);

    fn claimed(fp: Fingerprint, lease_until_ms: u64) -> KeyRecord {
        KeyRecord {
            fingerprint: fp,
            state: KeyState::Claimed {
                token: ClaimToken(7),
                lease_until_ms,
            },
        }
    }

    fn completed(fp: Fingerprint, expires_at_ms: u64) -> KeyRecord {
        KeyRecord {
            fingerprint: fp,
            state: KeyState::Completed {
                token: ClaimToken(3),
                result: 0,
                expires_at_ms,
            },
        }
    }

    #[test]
    fn the_decision_table() {
        let decide =
            |existing: Option<&KeyRecord>, fp: &Fingerprint, now| decide(existing, fp, now, T);
        let fresh = Claim::Acquired {
            token: T,
            taken_over: false,
        };
        assert_eq!(decide(None, &A, 100), fresh);
        // Live claim: same fingerprint waits, another conflicts (mismatch first).
        assert_eq!(decide(Some(&claimed(A, 101)), &A, 100), Claim::InProgress);
        assert_eq!(decide(Some(&claimed(A, 101)), &B, 100), Claim::Conflict);
        // Lease ran out (the boundary included): taken over whatever the fingerprint.
        let takeover = Claim::Acquired {
            token: T,
            taken_over: true,
        };
        assert_eq!(decide(Some(&claimed(A, 100)), &A, 100), takeover);
        assert_eq!(decide(Some(&claimed(A, 100)), &B, 100), takeover);
        // Completed and live: replay or conflict; expired: a fresh claim.
        assert_eq!(
            decide(Some(&completed(A, 101)), &A, 100),
            Claim::Replay { result: 0 }
        );
        assert_eq!(decide(Some(&completed(A, 101)), &B, 100), Claim::Conflict);
        assert_eq!(decide(Some(&completed(A, 100)), &B, 100), fresh);
    }

    #[test]
    fn completions_never_overwrite_another_live_claim_or_completion() {
        let mine = ClaimToken(7);
        // Its own claim, lapsed or not; a free or expired key.
        assert!(completion_allowed(Some(&claimed(A, 101)), mine, 100));
        assert!(completion_allowed(Some(&claimed(A, 50)), mine, 100));
        assert!(completion_allowed(None, mine, 100));
        assert!(completion_allowed(Some(&completed(B, 100)), mine, 100));
        assert!(completion_allowed(Some(&claimed(B, 100)), T, 100));
        // Another caller's live claim or completion.
        assert!(!completion_allowed(Some(&claimed(A, 101)), T, 100));
        assert!(!completion_allowed(Some(&completed(A, 101)), mine, 100));
        // Its own completion, retried after a lost answer.
        assert!(completion_allowed(
            Some(&completed(A, 101)),
            ClaimToken(3),
            100
        ));
        assert!(is_claim(Some(&claimed(A, 1)), mine));
        assert!(!is_claim(Some(&claimed(A, 1)), T));
        assert!(!is_claim(Some(&completed(A, 1)), mine));
    }

    #[test]
    fn a_kept_fingerprint_is_its_first_16_bytes_and_matches_only_its_own() {
        let a = fingerprint(b"a");
        let kept = kept_fingerprint(&a);
        assert_eq!(kept[..16], a[..16]);
        assert_eq!(kept[16..], [0; 16]);
        assert!(same_fingerprint(&kept, &a));
        assert!(same_fingerprint(&a, &a));
        assert!(!same_fingerprint(&kept, &fingerprint(b"b")));
        assert!(
            !same_fingerprint(&a, &kept),
            "a whole one is compared whole"
        );
        assert_eq!(shown_fingerprint(&kept), &a[..16]);
        assert_eq!(shown_fingerprint(&a), &a[..]);
        // The decision table compares a kept one on what it kept.
        let done = |fp| KeyRecord {
            fingerprint: fp,
            state: KeyState::Completed {
                token: ClaimToken(3),
                result: 0,
                expires_at_ms: 101,
            },
        };
        assert_eq!(
            decide(Some(&done(kept)), &a, 100, T),
            Claim::Replay { result: 0 }
        );
        assert_eq!(
            decide(Some(&done(kept)), &fingerprint(b"b"), 100, T),
            Claim::Conflict
        );
    }

    #[test]
    fn fingerprints_are_sha256_and_empty_is_valid() {
        assert_eq!(
            fingerprint(b"")[..4],
            [0xe3, 0xb0, 0xc4, 0x42],
            "SHA-256 of the empty string"
        );
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
    }

    #[test]
    fn keys_are_shown_escaped_and_cut() {
        assert_eq!(display_key(b"job\n1"), "\"job\\n1\"");
        let long = display_key(&[b'x'; 300]);
        assert!(long.ends_with("... (300 bytes)"), "{long}");
    }
}
