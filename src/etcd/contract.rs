//! The store traits as the lead is redesigning them in `idempotency` and
//! `log_backup::records` (per-claim tokens, fenced completion, run claims). Until that
//! lands in main, the etcd stores implement these exact shapes; at the merge this file goes
//! and the stores use main's definitions.

use crate::error::Failure;
use crate::idempotency::Fingerprint;
use crate::log_backup::records::Sequence;
use crate::log_backup::SubCommand;

/// Unique per claim (a fencing token); never 0. On etcd it is the claim's lease ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimToken(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Claimed {
        token: ClaimToken,
        lease_until_ms: u64,
    },
    Completed {
        result: i32,
        expires_at_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRecord {
    pub fingerprint: Fingerprint,
    pub state: KeyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Acquired { token: ClaimToken, taken_over: bool },
    Replay { result: i32 },
    InProgress,
    Conflict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Recorded,
    Superseded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    Removed,
    Absent,
    InProgress,
}

pub trait IdempotencyStore: Send + Sync {
    /// decide() + record a claim with a fresh token, lease until now+lease. Durable before
    /// return. Fail closed.
    fn claim(&self, key: &[u8], fingerprint: &Fingerprint, now_ms: u64) -> Result<Claim, Failure>;
    /// Extend the leases of those claims that are still current (same token); others are
    /// skipped silently.
    fn renew(&self, claims: &[(Vec<u8>, ClaimToken)], now_ms: u64) -> Result<(), Failure>;
    /// Our claim still current (even if its lease lapsed but nobody took over), or the key
    /// free (absent/expired/released): record Completed with `fingerprint` and ttl ->
    /// Recorded. Another live claim or live completion: write nothing -> Superseded.
    fn complete(
        &self,
        key: &[u8],
        token: ClaimToken,
        fingerprint: &Fingerprint,
        result: i32,
        now_ms: u64,
    ) -> Result<Completion, Failure>;
    /// Drop the claim only if `token` is still the current claim; otherwise no-op.
    fn release(&self, key: &[u8], token: ClaimToken) -> Result<(), Failure>;
    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<KeyRecord>, Failure>;
    fn forget(&self, key: &[u8], now_ms: u64) -> Result<Forgotten, Failure>;
    fn maintain(&self, _now_ms: u64) -> Result<(), Failure> {
        Ok(())
    }
    fn maintenance_due(&self) -> bool {
        false
    }
}

pub trait LogRecordStore: Send + Sync {
    /// Takes the run of (task, command); Err(Failure code IN_PROGRESS) at once while another
    /// live runner (thread, process, host) holds it. The claim ends when the returned guard
    /// drops, or with its lease when the runner dies.
    fn begin_run(&self, task: &str, command: SubCommand)
        -> Result<Box<dyn RunClaim + '_>, Failure>;
    fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>, Failure>;
    /// Removes the records of (task, command); Err(IN_PROGRESS), nothing removed, while a
    /// run holds it.
    fn reset(&self, task: &str, command: SubCommand) -> Result<(), Failure>;
}

pub trait RunClaim {
    /// Persist the sequence, fenced on this run's claim (nothing is written if the claim is
    /// gone).
    fn save(&self, sequence: &Sequence) -> Result<(), Failure>;
    /// Remove the records (success clears them), fenced likewise.
    fn remove(&self) -> Result<(), Failure>;
}
