//! Helpers shared by the file store's unit tests.

use super::{FileIdempotencySettings, FileIdempotencyStore};
use crate::idempotency::{Claim, Fingerprint, IdempotencyStore};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

/// A 60 s lease, a 1 h TTL, and compaction once 4 KiB of the journal is dead.
pub fn settings() -> FileIdempotencySettings {
    FileIdempotencySettings {
        lease: Duration::from_secs(60),
        ttl: Duration::from_secs(3600),
        compaction_slack_bytes: 4096,
    }
}

pub fn open(dir: &Path) -> FileIdempotencyStore {
    FileIdempotencyStore::open(dir, settings()).unwrap()
}

/// The fingerprint [`fill`] runs its keys with.
pub const FP: Fingerprint = [7; 32];

/// Runs `key-<i>` for each `i` of `keys` to completion, with fingerprint [`FP`], at 10 ms.
pub fn fill(store: &FileIdempotencyStore, keys: Range<u32>) {
    for i in keys {
        let key = format!("key-{i}");
        let Ok(Claim::Acquired { token, .. }) = store.claim(key.as_bytes(), &FP, 10) else {
            panic!("{key} not acquired");
        };
        store.complete(key.as_bytes(), token, &FP, 0, 10).unwrap();
    }
}
