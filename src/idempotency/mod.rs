//! Idempotency keys (ABI §8): an operation keyed by its caller runs once, across threads,
//! processes sharing a `state_dir`, and crashes.
//!
//! The rules live here, apart from storage: [`decide`] says what a call finds a key in,
//! and [`IdempotencyStore`] is the small contract (claim with a lease, renew, complete,
//! release, get, forget) that the embedded [`file_store::FileStore`] implements and a
//! shared database could implement for a cluster of taosX nodes. [`keyed::Keyed`] runs an
//! operation under a key: claim, renew the lease while it runs, then complete or release.

pub mod file_store;
pub mod keyed;
pub mod lease;
pub mod record;

use crate::error::Failure;
use sha2::{Digest, Sha256};

/// Longest key, in bytes (ABI §8).
pub(crate) const MAX_KEY_BYTES: usize = 255;

/// SHA-256 of the bytes that identify a request's payload.
pub type Fingerprint = [u8; 32];

pub fn fingerprint(payload: &[u8]) -> Fingerprint {
    Sha256::digest(payload).into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// An owner runs the operation; after `lease_until_ms` a dead owner's claim is taken over.
    Claimed { owner: u64, lease_until_ms: u64 },
    /// The operation succeeded with `result`; replayed until `expires_at_ms`.
    Completed { result: i32, expires_at_ms: u64 },
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
    /// The caller owns the key now and runs the operation; `taken_over`: from an owner
    /// whose lease ran out.
    Acquired { taken_over: bool },
    /// Completed earlier with the same fingerprint: return `result` without running.
    Replay { result: i32 },
    /// Another live owner runs it.
    InProgress,
    /// Completed or claimed with a different fingerprint.
    Conflict,
}

/// The decision table of ABI §8. A mismatch is reported before "in progress"; a lease that
/// ran out is taken over whatever its fingerprint; an expired completion is forgotten.
pub fn decide(existing: Option<&KeyRecord>, fingerprint: &Fingerprint, now_ms: u64) -> Claim {
    let Some(record) = existing else {
        return Claim::Acquired { taken_over: false };
    };
    match (record.state, record.is_live(now_ms)) {
        (KeyState::Claimed { .. }, false) => Claim::Acquired { taken_over: true },
        (KeyState::Completed { .. }, false) => Claim::Acquired { taken_over: false },
        _ if record.fingerprint != *fingerprint => Claim::Conflict,
        (KeyState::Claimed { .. }, true) => Claim::InProgress,
        (KeyState::Completed { result, .. }, true) => Claim::Replay { result },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    Removed,
    /// Nothing was stored under the key.
    Absent,
    /// A live owner runs it: kept.
    InProgress,
}

/// Where idempotency records live. Every method is atomic with respect to other callers
/// of the same store, in this process and in others sharing it; a method that returns
/// `Ok` after writing has made the write durable.
pub trait IdempotencyStore: Send + Sync {
    /// Decides on `key` as [`decide`] does and, when acquired, records a claim owned by
    /// this store handle with a lease until `now_ms + lease`. Durable before it returns,
    /// and it reserves the room the key's completion needs: a claim that cannot be
    /// recorded is an error, and the operation must not run.
    fn claim(&self, key: &[u8], fingerprint: &Fingerprint, now_ms: u64) -> Result<Claim, Failure>;

    /// Extends the leases of the given keys that this handle still owns to `now_ms + lease`.
    fn renew(&self, keys: &[Vec<u8>], now_ms: u64) -> Result<(), Failure>;

    /// Records the success of a claimed key; replayed until `now_ms + ttl`.
    fn complete(&self, key: &[u8], result: i32, now_ms: u64) -> Result<(), Failure>;

    /// Drops this handle's claim of `key` (the operation failed; a later call may try).
    fn release(&self, key: &[u8]) -> Result<(), Failure>;

    /// The live record of `key`, if any.
    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<KeyRecord>, Failure>;

    /// Drops a completed or abandoned key, so that its operation may run again. A key
    /// that a live owner is running is not dropped.
    fn forget(&self, key: &[u8], now_ms: u64) -> Result<Forgotten, Failure>;

    /// Housekeeping (dropping expired records); called from time to time, off the callers' path.
    fn maintain(&self, _now_ms: u64) -> Result<(), Failure> {
        Ok(())
    }

    /// Whether housekeeping should run now rather than at its next regular time.
    fn maintenance_due(&self) -> bool {
        false
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

    fn claimed(fp: Fingerprint, lease_until_ms: u64) -> KeyRecord {
        KeyRecord {
            fingerprint: fp,
            state: KeyState::Claimed {
                owner: 7,
                lease_until_ms,
            },
        }
    }

    fn completed(fp: Fingerprint, expires_at_ms: u64) -> KeyRecord {
        KeyRecord {
            fingerprint: fp,
            state: KeyState::Completed {
                result: 0,
                expires_at_ms,
            },
        }
    }

    #[test]
    fn the_decision_table() {
        let fresh = Claim::Acquired { taken_over: false };
        assert_eq!(decide(None, &A, 100), fresh);
        // Live claim: same fingerprint waits, another conflicts (mismatch first).
        assert_eq!(decide(Some(&claimed(A, 101)), &A, 100), Claim::InProgress);
        assert_eq!(decide(Some(&claimed(A, 101)), &B, 100), Claim::Conflict);
        // Lease ran out (the boundary included): taken over whatever the fingerprint.
        let takeover = Claim::Acquired { taken_over: true };
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
