//! Reading the whole journal, for the operator's command line (docs/C_API.md §11): every
//! key's current record, a key's record whatever its age, and a check of every record and
//! of the token counters. Nothing here is on the callers' path: the plugin never calls it.
//!
//! Records before the end a transaction has read are never rewritten (the journal is
//! append-only, and a compaction writes a new file): a scan reads them with no lock held,
//! from its own handle of the file, while taosX goes on appending or compacting.

use super::journal::{for_each_record, good_record_after, CHUNK};
use super::tokens::Tokens;
use super::FileIdempotencyStore;
use crate::durable::FileError;
use crate::error::{Error, Result};
use crate::idempotency::KeyRecord;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

impl FileIdempotencyStore {
    /// Every key's current record, live at `now_ms`, sorted by key.
    pub fn live_records(&self, now_ms: u64) -> Result<impl Iterator<Item = (Vec<u8>, KeyRecord)>> {
        let mut live = Vec::new();
        self.each_record(|key, record| {
            if record.is_live(now_ms) {
                live.push((key.to_vec(), *record));
            }
        })?;
        live.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(live.into_iter())
    }

    /// Every key's current record, expired ones included (a lapsed claim, an expired
    /// completion that no compaction has dropped yet), sorted by key.
    pub fn all_records(&self) -> Result<BTreeMap<Vec<u8>, KeyRecord>> {
        let mut all = BTreeMap::new();
        self.each_record(|key, record| {
            all.insert(key.to_vec(), *record);
        })?;
        Ok(all)
    }

    /// Hands each key's current record (expired ones included) to `f`, in journal order:
    /// the journal is read from its start to the end this handle has caught up to, and the
    /// records the index points at are the ones handed on. Memory: 8 bytes a key beyond
    /// the index the store already holds, whatever `f` keeps.
    pub fn each_record(&self, mut f: impl FnMut(&[u8], &KeyRecord)) -> Result<()> {
        // Up to date with every process: what they appended is read, a compaction followed.
        self.transact(|_| ())?;
        let (journal, end, offsets) = {
            let inner = self.inner.lock();
            let offsets: Option<Vec<u64>> = inner.index.slots().map(|slots| {
                slots
                    .iter()
                    .filter(|slot| slot.is_full())
                    .map(|slot| slot.offset())
                    .collect()
            });
            (inner.journal.clone(), inner.end, offsets)
        };
        let bad = match offsets {
            Some(mut offsets) => {
                offsets.sort_unstable();
                let mut next = offsets.iter().peekable();
                for_each_record(&journal, &self.journal_path, 0, end, |at, _, entry| {
                    if next.peek() == Some(&&at) {
                        next.next();
                        if let Some(state) = &entry.state {
                            f(&entry.key, state);
                        }
                    }
                    Ok::<(), Error>(())
                })?
            }
            None => {
                // The index is growing (its slots move): each key's last record, by key.
                let mut keys: BTreeMap<Vec<u8>, KeyRecord> = BTreeMap::new();
                let bad = for_each_record(&journal, &self.journal_path, 0, end, |_, _, entry| {
                    match entry.state {
                        Some(state) => keys.insert(entry.key, state),
                        None => keys.remove(&entry.key),
                    };
                    Ok::<(), Error>(())
                })?;
                for (key, record) in &keys {
                    f(key, record);
                }
                bad
            }
        };
        match bad {
            Some(offset) => Err(super::journal::corruption(
                &self.journal_path,
                format!("the record at byte {offset} does not check"),
            )),
            None => Ok(()),
        }
    }

    /// The record of `key` as the journal has it, expired or not (`get` answers only live
    /// records): what `keys why` explains.
    pub fn record_of(&self, key: &[u8]) -> Result<Option<KeyRecord>> {
        self.transact(|txn| txn.get(key))
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub journal: PathBuf,
    /// Bytes of the journal checked.
    pub bytes: u64,
    /// Records that check.
    pub records: u64,
    /// The first record that does not check, with good records after it: corruption.
    pub corrupt_at: Option<u64>,
    /// Bad bytes at the very end and nothing good after them: a writer died mid-write
    /// (the next open cuts them off); not corruption.
    pub torn_at: Option<u64>,
    pub tokens: PathBuf,
    /// The token counters (last issued, durable floor), or why they do not check.
    pub counters: Result<(u64, u64), String>,
}

impl Verified {
    pub fn is_ok(&self) -> bool {
        self.corrupt_at.is_none() && self.counters.is_ok()
    }
}

/// Checks every record of the journal under `<state_dir>/idempotency/` and the token
/// counter file, without opening the store (an open refuses a corrupt journal, and would
/// skip the records its index image covers). `progress` is told the bytes checked so far,
/// and first the journal's length. Creates nothing.
pub fn verify(state_dir: &Path, mut progress: impl FnMut(u64, u64)) -> Result<Verified> {
    let dir = state_dir.join("idempotency");
    let journal_path = dir.join("journal");
    let tokens_path = dir.join("tokens");
    let journal =
        File::open(&journal_path).map_err(|e| FileError::new("open", &journal_path, e))?;
    let end = journal
        .metadata()
        .map_err(|e| FileError::new("stat", &journal_path, e))?
        .len();
    progress(0, end);
    let mut records = 0u64;
    let mut next_report = 0u64;
    let bad = for_each_record(&journal, &journal_path, 0, end, |at, len, _| {
        records += 1;
        let done = at + len as u64;
        if done >= next_report {
            progress(done, end);
            next_report = done + CHUNK as u64 / 4;
        }
        Ok::<(), Error>(())
    })?;
    let (mut corrupt_at, mut torn_at) = (None, None);
    if let Some(offset) = bad {
        if good_record_after(&journal, &journal_path, offset, end)? {
            corrupt_at = Some(offset);
        } else {
            torn_at = Some(offset);
        }
    }
    progress(bad.unwrap_or(end), end);
    let counters = if tokens_path.exists() {
        Tokens::open(tokens_path.clone())
            .and_then(|tokens| tokens.counters())
            .map_err(|failure| failure.detail())
    } else {
        // No claim was ever made: tokens start from the clock.
        Ok((0, 0))
    };
    Ok(Verified {
        journal: journal_path,
        bytes: bad.unwrap_or(end),
        records,
        corrupt_at,
        torn_at,
        tokens: tokens_path,
        counters,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{fill, open, FP};
    use super::*;
    use crate::idempotency::record;
    use crate::idempotency::{Claim, IdempotencyStore, KeyState};
    use std::fs;

    #[test]
    fn live_records_keep_each_keys_last_record_and_drop_released_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        fill(&store, 0..5);
        let Ok(Claim::Acquired { token, .. }) = store.claim(b"running", &FP, 10) else {
            panic!("not acquired");
        };
        store.forget(b"key-1", 11).unwrap();
        let listed: Vec<_> = store.live_records(12).unwrap().collect();
        let keys: Vec<&[u8]> = listed.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(
            keys,
            [&b"key-0"[..], b"key-2", b"key-3", b"key-4", b"running"]
        );
        assert!(matches!(
            listed[4].1.state,
            KeyState::Claimed { token: t, .. } if t == token
        ));
        // Past the lease, the claim is no longer live, but its record is still there.
        assert_eq!(store.live_records(10 + 61_000).unwrap().count(), 4);
        assert!(store.record_of(b"running").unwrap().is_some());
        assert_eq!(store.record_of(b"key-1").unwrap(), None);
    }

    #[test]
    fn verify_names_the_first_bad_record_and_tells_a_torn_end_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        fill(&store, 0..20);
        let journal = store.journal_path().to_path_buf();
        drop(store);
        let good = verify(dir.path(), |_, _| {}).unwrap();
        assert!(good.is_ok(), "{good:?}");
        assert_eq!(good.records, 40);
        assert!(good.counters.unwrap().0 > 0);
        let bytes = fs::read(&journal).unwrap();
        // A torn end: not corruption.
        fs::write(&journal, &bytes[..bytes.len() - 3]).unwrap();
        let torn = verify(dir.path(), |_, _| {}).unwrap();
        assert!(torn.is_ok() && torn.torn_at.is_some(), "{torn:?}");
        // A flipped byte in the second record.
        let mut bad = bytes.clone();
        let second = record::record_len(&bad).unwrap();
        bad[second + 5] ^= 0x20;
        fs::write(&journal, &bad).unwrap();
        let found = verify(dir.path(), |_, _| {}).unwrap();
        assert_eq!(found.corrupt_at, Some(second as u64));
        assert_eq!(found.records, 1);
        assert!(!found.is_ok());
        // A token counter that does not check.
        fs::write(&journal, &bytes).unwrap();
        let tokens = dir.path().join("idempotency/tokens");
        let mut counters = fs::read(&tokens).unwrap();
        counters[0] ^= 1;
        fs::write(&tokens, &counters).unwrap();
        let found = verify(dir.path(), |_, _| {}).unwrap();
        assert!(found.counters.is_err(), "{found:?}");
    }
}
