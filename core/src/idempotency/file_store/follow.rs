//! Following another process's compaction without stalling every process: the new
//! journal's index is loaded from its image, and the records past the image applied to it,
//! with no lock held (a few hundred ms at 10 M keys). Under the locks, the journal's bytes
//! past the image are compared with those applied (a whole record cut off after a failed
//! write and written over would differ), and only what was appended since is read.
//! Before, the image was loaded and the records past it applied under the journal's
//! `flock`, so that every process waited for it.

use super::files::{advise_random, open_rw};
use super::image;
use super::index::Index;
use super::journal::apply;
use super::{FileIdempotencyStore, Held, Inner};
use crate::durable::FileError;
use crate::error::Result;
use crate::idempotency::record;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// The index of a journal that replaced the one in use, loaded ahead of the switch.
pub(super) struct Followed {
    journal: Arc<File>,
    inode: u64,
    index: Index,
    /// Where the image ends: the records from there to `end` were read with no lock held.
    imaged: u64,
    /// Those records' bytes, checked against the journal under the locks.
    tail: Vec<u8>,
    /// The journal offset the index covers.
    end: u64,
}

/// Most bytes past the image read ahead of the switch (more is read under the locks).
const MAX_TAIL: u64 = 64 << 20;

impl FileIdempotencyStore {
    /// Whether the journal this process reads was replaced (renamed over by a compaction).
    pub(super) fn replaced(&self, inner: &Inner) -> Result<bool> {
        let meta = inner
            .journal
            .metadata()
            .map_err(|e| FileError::new("stat", &self.journal_path, e))?;
        Ok(meta.nlink() == 0)
    }

    /// The journal file now at the journal's path (read at random offsets), and its inode.
    fn journal_in_place(&self) -> Result<(Arc<File>, u64)> {
        let journal = Arc::new(open_rw(&self.journal_path)?);
        advise_random(&journal);
        let inode = journal
            .metadata()
            .map_err(|e| FileError::new("stat", &self.journal_path, e))?
            .ino();
        Ok((journal, inode))
    }

    /// Loads the index of the journal now in place, holding no lock but `followed` (the
    /// other threads that need it wait for this one's load rather than load it again).
    pub(super) fn prepare_follow(&self) -> Result<()> {
        let mut followed = self.followed.lock();
        let (journal, inode) = self.journal_in_place()?;
        if followed.as_ref().is_some_and(|f| f.inode == inode) {
            return Ok(());
        }
        *followed = None;
        let (mut index, imaged) = image::load(&self.image_path, &journal).unwrap_or_default();
        // The whole records past the image, as far as they check now: a record being
        // written ends them. Whether they still stand is checked under the locks.
        let len = journal.metadata().map_or(imaged, |m| m.len());
        let mut tail = vec![0; (len.saturating_sub(imaged)).min(MAX_TAIL) as usize];
        if journal.read_exact_at(&mut tail, imaged).is_err() {
            tail.clear();
        }
        let mut at = 0;
        while let Some((entry, n)) = record::decode(&tail[at..]) {
            let offset = imaged + at as u64;
            if apply(&mut index, &journal, &self.journal_path, &entry, offset).is_err() {
                // Read while being rewritten: the locked path reads it whole.
                return Ok(());
            }
            at += n;
        }
        tail.truncate(at);
        *followed = Some(Followed {
            journal,
            inode,
            index,
            imaged,
            end: imaged + at as u64,
            tail,
        });
        Ok(())
    }

    /// The journal now in place and its index as far as loaded (under the locks): the
    /// one prepared ahead when it is of this journal, else loaded now.
    pub(super) fn follow(&self) -> Result<(Arc<File>, Index, u64)> {
        let _held = Held::since_now(self);
        let (journal, inode) = self.journal_in_place()?;
        // Never wait here for a load in progress: it may be of another file.
        let prepared = self.followed.try_lock().and_then(|mut f| f.take());
        if let Some(f) = prepared.filter(|f| f.inode == inode) {
            let mut now = vec![0; f.tail.len()];
            let same = f.journal.read_exact_at(&mut now, f.imaged).is_ok() && now == f.tail;
            if same {
                return Ok((f.journal, f.index, f.end));
            }
        }
        let (index, end) = image::load(&self.image_path, &journal).unwrap_or_default();
        Ok((journal, index, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::{Claim, ClaimToken, IdempotencyStore, KeyRecord, KeyState};

    const FP: [u8; 32] = [3; 32];

    use super::super::test_support::open;

    #[test]
    fn records_read_ahead_that_were_cut_off_and_written_over_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let compactor = open(dir.path());
        let follower = open(dir.path());
        for i in 0..100u32 {
            let key = format!("key-{i}");
            let Ok(Claim::Acquired { token, .. }) = compactor.claim(key.as_bytes(), &FP, 10) else {
                panic!("{key}");
            };
            compactor
                .complete(key.as_bytes(), token, &FP, 0, 10)
                .unwrap();
        }
        compactor.compact_now(10).unwrap();
        let cut = compactor.journal_len();
        compactor.claim(b"x", &FP, 10).unwrap();
        // The follower reads the new journal ahead, "x" claimed past the image...
        follower.prepare_follow().unwrap();
        assert!(follower.followed.lock().as_ref().unwrap().end > cut);
        // ...then that record is cut off (a failed write) and another written over it.
        let journal = open_rw(follower.journal_path()).unwrap();
        journal.set_len(cut).unwrap();
        let mut other = Vec::new();
        let claimed = KeyRecord {
            fingerprint: FP,
            state: KeyState::Claimed {
                token: ClaimToken(fastrand::u64(1..)),
                lease_until_ms: 1_000_000,
            },
        };
        record::encode(&mut other, b"yy", Some(&claimed));
        journal.write_all_at(&other, cut).unwrap();
        // The follower sees the journal as it is, not as it read it.
        assert_eq!(follower.claim(b"yy", &FP, 11).unwrap(), Claim::InProgress);
        assert!(matches!(
            follower.claim(b"x", &FP, 11).unwrap(),
            Claim::Acquired {
                taken_over: false,
                ..
            }
        ));
        assert_eq!(
            follower.claim(b"key-7", &FP, 11).unwrap(),
            Claim::Replay { result: 0 }
        );
    }

    #[test]
    fn a_journal_read_ahead_is_used_and_the_rest_read_under_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let compactor = open(dir.path());
        let follower = open(dir.path());
        compactor.claim(b"a", &FP, 10).unwrap();
        compactor.compact_now(10).unwrap();
        compactor.claim(b"b", &FP, 10).unwrap();
        follower.prepare_follow().unwrap();
        compactor.claim(b"c", &FP, 10).unwrap();
        for key in [&b"a"[..], b"b", b"c"] {
            assert_eq!(follower.claim(key, &FP, 11).unwrap(), Claim::InProgress);
        }
        assert!(
            follower.followed.lock().is_none(),
            "the read-ahead was used"
        );
    }
}
