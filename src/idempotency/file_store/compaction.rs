//! Compaction: the journal rewritten with its live records, without stalling callers for
//! the snapshot (only the tail appended meanwhile is copied under the lock).

use super::files::{reserve, FileLock};
use super::journal::room_for;
use super::{FileStore, RESERVE_CHUNK};
use crate::durable::{self, FileError};
use crate::error::Failure;
use crate::idempotency::record;
use crate::idempotency::KeyState;
use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl FileStore {
    /// Rewrites the journal with its live records once it has grown enough.
    pub(super) fn compact(&self, now_ms: u64) -> Result<(), Failure> {
        let Some(_in_process) = self.compaction.try_lock() else {
            return Ok(());
        };
        let Some(_across_processes) =
            FileLock::acquire(&self.compact_lock, &self.compact_lock_path, false)?
        else {
            return Ok(());
        };
        // 1. Under the lock: the live records, and where the journal ends.
        let (snapshot, from, generation) = {
            let mut inner = self.inner.lock();
            let _lock = self.lock_journal()?;
            self.catch_up(&mut inner)?;
            if inner.end <= inner.compact_at {
                self.compaction_due.store(false, Ordering::Relaxed);
                return Ok(());
            }
            let mut snapshot = Vec::new();
            for (key, record) in inner.index.iter().filter(|(_, r)| r.is_live(now_ms)) {
                record::encode(&mut snapshot, key, Some(record));
            }
            (snapshot, inner.end, inner.generation)
        };
        // 2. Without it: the snapshot, written to the side.
        let _ = fs::remove_file(&self.compact_path);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.compact_path)
            .map_err(|e| FileError::new("create", &self.compact_path, e))?;
        let side = |e| Failure::from(FileError::new("write", &self.compact_path, e));
        file.write_all(&snapshot).map_err(side)?;
        // 3. Under the lock again: what was appended meanwhile, then the switch.
        let mut inner = self.inner.lock();
        let _lock = self.lock_journal()?;
        self.catch_up(&mut inner)?;
        if inner.generation != generation {
            let _ = fs::remove_file(&self.compact_path);
            return Ok(());
        }
        let mut tail = vec![0; (inner.end - from) as usize];
        inner
            .journal
            .read_exact_at(&mut tail, from)
            .map_err(|e| FileError::new("read", &self.journal_path, e))?;
        let new_len = (snapshot.len() + tail.len()) as u64;
        let result = file
            .write_all(&tail)
            .and_then(|()| reserve(&file, new_len, room_for(inner.claims) + RESERVE_CHUNK))
            .and_then(|_| file.sync_data())
            .map_err(side)
            .and_then(|()| {
                fs::rename(&self.compact_path, &self.journal_path)
                    .map_err(|e| FileError::new("rename", &self.compact_path, e).into())
            });
        if let Err(failure) = result {
            let _ = fs::remove_file(&self.compact_path);
            return Err(failure);
        }
        // The rename must be durable before anything is appended to the new journal.
        durable::sync_dir(&self.dir)?;
        let touched: HashSet<Vec<u8>> = tail
            .split(|&b| b == b'\n')
            .filter_map(record::decode)
            .map(|entry| entry.key)
            .collect();
        inner
            .index
            .retain(|key, record| record.is_live(now_ms) || touched.contains(&key[..]));
        inner.claims = inner
            .index
            .values()
            .filter(|r| matches!(r.state, KeyState::Claimed { .. }))
            .count() as u64;
        let file = Arc::new(file);
        inner.journal = file.clone();
        inner.generation += 1;
        inner.end = new_len;
        inner.allocated = 0;
        inner.compact_at = (new_len * 2).max(new_len + self.slack);
        let mut sync = self.sync.lock();
        sync.generation = inner.generation;
        sync.file = file;
        sync.written = new_len;
        sync.synced = new_len;
        drop(sync);
        self.synced.notify_all();
        self.compactions.fetch_add(1, Ordering::Relaxed);
        self.compaction_due.store(false, Ordering::Relaxed);
        tracing::info!(
            from_bytes = from,
            to_bytes = new_len,
            "idempotency journal compacted"
        );
        Ok(())
    }
}
