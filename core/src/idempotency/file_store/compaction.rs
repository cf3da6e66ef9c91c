//! Compaction and index images, without stalling callers.
//!
//! Compaction rewrites the journal with its live records to a side file: the old journal
//! is scanned without the lock, each record kept if it is live and still its key's last
//! one (checked against the index in short batches under the mutex), and a new index is
//! built as the records are written. What callers append meanwhile is copied in rounds
//! without the lock; only the last few records (under 64 KB) are copied under it before
//! the new file (already fsynced, its room reserved) and the image of its index are
//! renamed into place. The new file and the images are synced every few MB as they are
//! written, so that the callers' own fsyncs never wait for hundreds of MB of them; the
//! files replaced are closed after the lock is released, so that their blocks are not
//! freed under it. [`FileIdempotencyStore::longest_maintenance_hold`] tells how long the mutex was
//! held at most.
//!
//! Between compactions, once the journal has grown past what the image on disk covers by a
//! sixteenth, the index is written as a new image, copied in pieces under the mutex (slots
//! move only while the table grows, and keys whose last record lies past the image's end
//! are left to the journal), so that a restart replays a short tail.

use super::files::{
    advise_random, create_fresh, free_gradually, open_replaced, reserve, FileLock, Paced,
    SYNC_EVERY,
};
use super::image::{Covers, ImageWriter};
use super::index::{hash_key, Index, Slot};
use super::journal::{apply, corruption, for_each_record, room_for};
use super::{FileIdempotencyStore, Held, RESERVE_CHUNK};
use crate::durable::{self, FileError};
use crate::error::{Error, Result};
use crate::idempotency::record::{self, MAX_RECORD_BYTES};
use crate::idempotency::KeyState;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Live records checked against the index at a time (one short hold of the mutex each).
const BATCH: usize = 1024;
/// Slots copied into an image at a time under the mutex.
const IMAGE_PIECE: usize = 4096;
/// The tail is copied in rounds without the lock until this little is left.
const TAIL_UNDER_LOCK: u64 = 64 << 10;

/// Why a rewrite stopped early.
enum Stop {
    /// Another process compacted meanwhile: its journal stands, ours is dropped.
    Abandoned,
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(failure: Error) -> Self {
        Stop::Failed(failure)
    }
}

impl From<FileError> for Stop {
    fn from(error: FileError) -> Self {
        Stop::Failed(error.into())
    }
}

/// The new journal being written, and its index.
struct Rewrite<'a> {
    path: &'a Path,
    file: File,
    index: Index,
    /// Bytes written to the file; `out` follows them.
    flushed: u64,
    out: Vec<u8>,
    paced: Paced,
}

impl Rewrite<'_> {
    /// Adds a record of a key not yet in the new journal.
    fn push_new(&mut self, bytes: &[u8], hash: u64, claim: bool) -> Result<()> {
        let offset = self.flushed + self.out.len() as u64;
        self.index.insert_new(hash, offset, claim);
        self.out.extend_from_slice(bytes);
        if self.out.len() >= SYNC_EVERY as usize {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .write_all_at(&self.out, self.flushed)
            .and_then(|()| self.paced.wrote(&self.file, self.out.len()))
            .map_err(|e| FileError::new("write", self.path, e))?;
        self.flushed += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// Copies the records `from..to` of `old` (appended since the snapshot) as they are.
    fn copy_tail(&mut self, old: &File, old_path: &Path, from: u64, to: u64) -> Result<()> {
        self.flush()?;
        if to == from {
            return Ok(());
        }
        let mut tail = vec![0; (to - from) as usize];
        old.read_exact_at(&mut tail, from)
            .map_err(|e| FileError::new("read", old_path, e))?;
        // In pieces of what is synced at a time, as the rest of the file.
        for (n, piece) in tail.chunks(SYNC_EVERY as usize).enumerate() {
            let at = self.flushed + (n as u64) * SYNC_EVERY;
            self.file
                .write_all_at(piece, at)
                .and_then(|()| self.paced.wrote(&self.file, piece.len()))
                .map_err(|e| FileError::new("write", self.path, e))?;
        }
        let mut at = 0;
        while at < tail.len() {
            let (entry, len) = record::decode(&tail[at..]).ok_or_else(|| {
                corruption(
                    old_path,
                    format!("the record at byte {} does not check", from + at as u64),
                )
            })?;
            apply(
                &mut self.index,
                &self.file,
                self.path,
                &entry,
                self.flushed + at as u64,
            )?;
            at += len;
        }
        self.flushed += tail.len() as u64;
        Ok(())
    }
}

/// A live record of the old journal, waiting to be checked against the index.
struct Candidate {
    offset: u64,
    hash: u64,
    claim: bool,
    start: usize,
    len: usize,
}

/// The right to rewrite the store's side files: one thread of one process at a time.
struct Maintainer<'a> {
    _in_process: parking_lot::MutexGuard<'a, ()>,
    _across_processes: FileLock<'a>,
}

impl FileIdempotencyStore {
    /// Takes the maintainer's locks without waiting; `None` when another thread or
    /// process maintains the store now (it does the work).
    fn maintainer(&self) -> Result<Option<Maintainer<'_>>> {
        let Some(in_process) = self.compaction.try_lock() else {
            return Ok(None);
        };
        let across = FileLock::acquire(&self.compact_lock, &self.compact_lock_path, false)?;
        Ok(across.map(|across_processes| Maintainer {
            _in_process: in_process,
            _across_processes: across_processes,
        }))
    }

    /// Rewrites the journal with its live records once it has grown enough (or now, when
    /// `force`).
    pub(super) fn compact(&self, now_ms: u64, force: bool) -> Result<()> {
        let Some(_maintainer) = self.maintainer()? else {
            return Ok(());
        };
        // 1. Under the lock: where the journal ends.
        let (from, generation, old, keys) = {
            let mut inner = self.inner.lock();
            let _held = Held::since_now(self);
            let _lock = self.lock_journal()?;
            self.catch_up(&mut inner)?;
            if !force && inner.end <= inner.compact_at {
                self.compaction_due.store(false, Ordering::Relaxed);
                return Ok(());
            }
            (
                inner.end,
                inner.generation,
                inner.journal.clone(),
                inner.index.len(),
            )
        };
        let file = create_fresh(&self.compact_path)?;
        // It becomes the journal: read at random offsets.
        advise_random(&file);
        let rewrite = Rewrite {
            path: &self.compact_path,
            file,
            index: Index::with_capacity(keys),
            flushed: 0,
            out: Vec::with_capacity(SYNC_EVERY as usize + MAX_RECORD_BYTES),
            paced: Paced::default(),
        };
        match self.rewrite(now_ms, rewrite, &old, from, generation) {
            Ok(()) => {
                // The old journal's blocks, freed a slice at a time, not all at its close.
                free_gradually(&old);
                Ok(())
            }
            Err(stop) => {
                let _ = fs::remove_file(&self.compact_path);
                let _ = fs::remove_file(&self.image_tmp_path);
                match stop {
                    Stop::Abandoned => Ok(()),
                    Stop::Failed(failure) => Err(failure),
                }
            }
        }
    }

    fn rewrite(
        &self,
        now_ms: u64,
        mut rw: Rewrite<'_>,
        old: &File,
        from: u64,
        generation: u64,
    ) -> Result<(), Stop> {
        self.copy_live(now_ms, &mut rw, old, from, generation)?;
        let Unlocked {
            copied,
            covered,
            imaged,
            reserved_to,
        } = self.catch_up_unlocked(&mut rw, old, from, generation)?;
        let side = |e| Error::from(FileError::new("write", &self.compact_path, e));
        // The image replaced stays open until the lock is released: the rename then does
        // not free its blocks (tens of ms for a large file) under the lock.
        let replaced_image = open_replaced(&self.image_path);
        // 4. Under the lock again: the last records appended, then the switch.
        let mut inner = self.inner.lock();
        let held = Held::since_now(self);
        let _lock = self.lock_journal()?;
        self.catch_up(&mut inner)?;
        if inner.generation != generation {
            return Err(Stop::Abandoned);
        }
        rw.copy_tail(old, &self.journal_path, copied, inner.end)?;
        let new_len = rw.flushed;
        let needed = new_len + room_for(rw.index.claims()) + RESERVE_CHUNK;
        if needed > reserved_to {
            reserve(&rw.file, new_len, needed - new_len).map_err(side)?;
        }
        rw.file.sync_data().map_err(side)?;
        // The records dropped, and those the image covers, are never read again: their
        // tokens must stay below the durable floor.
        self.tokens.raise_floor()?;
        // An image, if any, must not describe the old journal once the new one is in place.
        let image = if imaged {
            fs::rename(&self.image_tmp_path, &self.image_path)
        } else {
            fs::remove_file(&self.image_path).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
        };
        image.map_err(|e| Error::from(FileError::new("replace", &self.image_path, e)))?;
        fs::rename(&self.compact_path, &self.journal_path)
            .map_err(|e| FileError::new("rename", &self.compact_path, e))?;
        // The rename must be durable before anything is appended to the new journal.
        durable::sync_dir(&self.dir)?;
        let file = Arc::new(rw.file);
        // The old index is freed once the lock is released (unmapping takes milliseconds).
        let old_index = std::mem::replace(&mut inner.index, rw.index);
        inner.journal = file.clone();
        inner.generation += 1;
        inner.end = new_len;
        inner.imaged = if imaged { covered } else { 0 };
        inner.allocated = 0;
        inner.compact_at = (new_len * 2).max(new_len + self.slack);
        let mut sync = self.sync.lock();
        sync.generation = inner.generation;
        sync.file = file;
        sync.written = new_len;
        sync.synced = new_len;
        drop(sync);
        self.synced.notify_all();
        drop(held);
        drop(_lock);
        drop(inner);
        drop(old_index);
        if let Some(image) = replaced_image {
            free_gradually(&image);
        }
        self.compactions.fetch_add(1, Ordering::Relaxed);
        self.compaction_due.store(false, Ordering::Relaxed);
        tracing::info!(
            from_bytes = from,
            to_bytes = new_len,
            "idempotency journal compacted"
        );
        Ok(())
    }

    /// Step 2, without the lock: the live records of the old journal up to `from` that are
    /// their key's last, written to the new one in batches.
    fn copy_live(
        &self,
        now_ms: u64,
        rw: &mut Rewrite<'_>,
        old: &File,
        from: u64,
        generation: u64,
    ) -> Result<(), Stop> {
        let mut batch = Vec::with_capacity(BATCH);
        let mut bytes = Vec::new();
        let bad = for_each_record(old, &self.journal_path, 0, from, |offset, _, entry| {
            let Some(record) = entry.state.filter(|r| r.is_live(now_ms)) else {
                return Ok(());
            };
            let start = bytes.len();
            record::encode(&mut bytes, &entry.key, Some(&record));
            batch.push(Candidate {
                offset,
                hash: hash_key(&entry.key),
                claim: matches!(record.state, KeyState::Claimed { .. }),
                start,
                len: bytes.len() - start,
            });
            if batch.len() >= BATCH {
                self.keep_current(rw, &mut batch, &mut bytes, generation)?;
            }
            Ok::<(), Stop>(())
        })?;
        if let Some(offset) = bad {
            let why = format!("the record at byte {offset} does not check");
            return Err(corruption(&self.journal_path, why).into());
        }
        self.keep_current(rw, &mut batch, &mut bytes, generation)
    }

    /// Step 3, still without the lock: what callers appended meanwhile, in rounds; the
    /// image of the new index; room reserved for the switch. Returns how far the old
    /// journal is copied and what the image covers.
    fn catch_up_unlocked(
        &self,
        rw: &mut Rewrite<'_>,
        old: &File,
        from: u64,
        generation: u64,
    ) -> Result<Unlocked, Stop> {
        let mut copied = from;
        for _ in 0..16 {
            let end = self.caught_up_end(generation)?;
            if end - copied <= TAIL_UNDER_LOCK {
                break;
            }
            rw.copy_tail(old, &self.journal_path, copied, end)?;
            copied = end;
        }
        rw.flush()?;
        let side = |e| Error::from(FileError::new("write", &self.compact_path, e));
        rw.file.sync_data().map_err(side)?;
        rw.paced = Paced::default();
        // The image of the new journal's index, up to here.
        let covered = rw.flushed;
        // No image while the new index still grows (it was sized for the keys at the start).
        let imaged = covered >= 4 && rw.index.slots().is_some();
        if let (true, Some(slots)) = (imaged, rw.index.slots()) {
            let mut image = ImageWriter::create(&self.image_tmp_path)?;
            image.push(slots, covered, &self.image_tmp_path)?;
            let covers = Covers::of(&rw.file, covered).map_err(side)?;
            image.finish(covers, &self.image_tmp_path)?;
        }
        // Writing the image took a while: what was appended meanwhile, still unlocked.
        let end = self.caught_up_end(generation)?;
        rw.copy_tail(old, &self.journal_path, copied, end)?;
        copied = end;
        // Room for the tail still to come and for the completions of the claims, reserved
        // and made durable now, so that the switch under the lock rarely allocates.
        let ahead = 4 * TAIL_UNDER_LOCK + room_for(rw.index.claims()) + RESERVE_CHUNK;
        let reserved_to = match reserve(&rw.file, rw.flushed, ahead) {
            Ok(true) => rw.flushed + ahead,
            Ok(false) => u64::MAX,
            // A nearly full disk: only what the switch needs, under the lock.
            Err(_) => rw.flushed,
        };
        rw.file.sync_data().map_err(side)?;
        Ok(Unlocked {
            copied,
            covered,
            imaged,
            reserved_to,
        })
    }

    /// Writes the candidates that are still their key's last record to the new journal.
    fn keep_current(
        &self,
        rw: &mut Rewrite<'_>,
        batch: &mut Vec<Candidate>,
        bytes: &mut Vec<u8>,
        generation: u64,
    ) -> Result<(), Stop> {
        let (current, retired): (Vec<bool>, _) = {
            let mut inner = self.inner.lock();
            let _held = Held::since_now(self);
            if inner.generation != generation {
                return Err(Stop::Abandoned);
            }
            let current = batch
                .iter()
                .map(|c| inner.index.is_current(c.hash, c.offset))
                .collect();
            // A table the index outgrew meanwhile is freed now, not after the compaction:
            // the process would otherwise hold three tables at once.
            (current, inner.index.take_retired())
        };
        drop(retired);
        for (c, _) in batch.iter().zip(current).filter(|(_, keep)| *keep) {
            rw.push_new(&bytes[c.start..c.start + c.len], c.hash, c.claim)?;
        }
        batch.clear();
        bytes.clear();
        Ok(())
    }

    /// Where the journal ends once this process has read every append (briefly locked).
    fn caught_up_end(&self, generation: u64) -> Result<u64, Stop> {
        let mut inner = self.inner.lock();
        let _held = Held::since_now(self);
        let _lock = self.lock_journal()?;
        self.catch_up(&mut inner)?;
        if inner.generation != generation {
            return Err(Stop::Abandoned);
        }
        Ok(inner.end)
    }

    /// Writes the index as an image once the journal has grown well past the image on
    /// disk, so that a restart replays only a short tail.
    pub(super) fn checkpoint(&self) -> Result<()> {
        let (covered, generation, epoch, slots, journal) = {
            let inner = self.inner.lock();
            let _held = Held::since_now(self);
            let behind = inner.end.saturating_sub(inner.imaged);
            // While the index grows its slots move: the next maintenance writes it.
            let Some(slots) = inner.index.slots().map(<[Slot]>::len) else {
                return Ok(());
            };
            if inner.broken.is_some() || behind <= (inner.end / 16).max(self.slack) {
                return Ok(());
            }
            (
                inner.end,
                inner.generation,
                inner.index.epoch,
                slots,
                inner.journal.clone(),
            )
        };
        let Some(_maintainer) = self.maintainer()? else {
            return Ok(());
        };
        // Another process compacted since: its image stands (and the journal this one would
        // describe is being emptied); the next maintenance follows it.
        if journal.metadata().map_or(true, |meta| meta.nlink() == 0) {
            return Ok(());
        }
        let tmp = &self.image_tmp_path;
        // The image never covers records that a power loss could still take back.
        journal
            .sync_data()
            .map_err(|e| FileError::new("fsync", &self.journal_path, e))?;
        let covers = Covers::of(&journal, covered)
            .map_err(|e| FileError::new("read", &self.journal_path, e))?;
        let mut image = ImageWriter::create(tmp)?;
        let mut piece: Vec<Slot> = Vec::with_capacity(IMAGE_PIECE);
        for start in (0..slots).step_by(IMAGE_PIECE) {
            {
                let inner = self.inner.lock();
                let _held = Held::since_now(self);
                // Rebuilt (slots moved) or replaced: the next maintenance starts over.
                if inner.generation != generation || inner.index.epoch != epoch {
                    drop(inner);
                    let _ = fs::remove_file(tmp);
                    return Ok(());
                }
                let end = (start + IMAGE_PIECE).min(slots);
                piece.clear();
                let table = inner
                    .index
                    .slots()
                    .expect("not growing: the epoch is the same");
                piece.extend_from_slice(&table[start..end]);
            }
            image.push(&piece, covered, tmp)?;
        }
        image.finish(covers, tmp)?;
        // A restart does not read the records the image covers: their tokens stay below
        // the durable floor.
        self.tokens.raise_floor()?;
        // Closed after the lock, so that the rename does not free the old image under it.
        let replaced_image = open_replaced(&self.image_path);
        {
            let mut inner = self.inner.lock();
            let _held = Held::since_now(self);
            if inner.generation != generation {
                let _ = fs::remove_file(tmp);
                return Ok(());
            }
            fs::rename(tmp, &self.image_path).map_err(|e| FileError::new("rename", tmp, e))?;
            inner.imaged = covered;
        }
        if let Some(image) = replaced_image {
            free_gradually(&image);
        }
        tracing::debug!(covered, "idempotency index image written");
        Ok(())
    }
}

/// Where step 3 of a compaction left the new journal (see `catch_up_unlocked`).
struct Unlocked {
    /// The old journal is copied up to here.
    copied: u64,
    /// The new journal's bytes the image covers.
    covered: u64,
    /// Whether an image was written.
    imaged: bool,
    /// The new journal has room reserved up to here (`u64::MAX`: without limit).
    reserved_to: u64,
}

#[cfg(test)]
mod tests {
    use super::super::image;
    use super::*;
    use crate::idempotency::{Claim, IdempotencyStore};
    use std::os::unix::fs::MetadataExt;

    use super::super::test_support::{fill, open, FP};

    /// The journal a compaction replaced is emptied by the compacting process, not left for
    /// the last process that has it open to free whole; a process that had not followed
    /// yet still answers from the new one.
    #[test]
    fn a_replaced_journal_is_emptied_and_other_handles_follow() {
        let dir = tempfile::tempdir().unwrap();
        let compactor = open(dir.path());
        let other = open(dir.path());
        fill(&compactor, 0..400);
        assert_eq!(
            other.claim(b"key-1", &FP, 11).unwrap(),
            Claim::Replay { result: 0 }
        );
        let old = other.inner.lock().journal.clone();
        assert!(old.metadata().unwrap().blocks() > 0);
        compactor.compact_now(11).unwrap();
        let meta = old.metadata().unwrap();
        assert_eq!((meta.nlink(), meta.len(), meta.blocks()), (0, 0, 0));
        for i in [0, 7, 399] {
            let key = format!("key-{i}");
            assert_eq!(
                other.claim(key.as_bytes(), &FP, 12).unwrap(),
                Claim::Replay { result: 0 },
                "{key}"
            );
        }
    }

    /// A process that has not followed another's compaction yet writes no image of the
    /// journal replaced: the image on disk stays the new journal's.
    #[test]
    fn an_image_of_a_replaced_journal_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let stale = open(dir.path());
        let compactor = open(dir.path());
        fill(&stale, 0..300);
        compactor.compact_now(11).unwrap();
        // `stale` has read nothing since: its journal is the replaced one, and it is well
        // past its image (none).
        stale.checkpoint().unwrap();
        let journal = File::open(compactor.journal_path()).unwrap();
        let (index, _) = image::load(&dir.path().join("idempotency/index"), &journal)
            .expect("the image is the new journal's");
        assert_eq!(index.len(), 300);
        assert_eq!(
            stale.claim(b"key-299", &FP, 12).unwrap(),
            Claim::Replay { result: 0 }
        );
    }
}
