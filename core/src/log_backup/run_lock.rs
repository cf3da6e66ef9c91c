//! One runner per (task, command), across the threads and processes sharing a `state_dir`.
//!
//! All runs share one lock file, `log_backup/runs.lock`; a run holds a write lock on one
//! byte of it, at an offset given by a 62-bit hash of (task, command). The locks are
//! open-file-description locks (`F_OFD_SETLK`): the kernel drops them when the process
//! dies, so a dead runner never blocks the next, and nothing is created or removed per
//! run (no lock files pile up). Threads of this process share the one descriptor, whose
//! OFD locks never conflict with each other, so the slots this process holds are kept in
//! a set too; it holds only the runs in progress.

use crate::durable::FileError;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct RunLocks {
    path: PathBuf,
    /// Opened at the first run (the directory may not exist before).
    file: Mutex<Option<Arc<File>>>,
    /// Slots held by runs of this process.
    held: Mutex<HashSet<u64>>,
}

/// A held run slot; released when dropped.
pub struct RunSlot<'a> {
    locks: &'a RunLocks,
    file: Arc<File>,
    slot: u64,
}

/// The slot of `key` (a hash), within what `off_t` can address.
pub fn slot_of(hash: u64) -> u64 {
    hash >> 2
}

impl RunLocks {
    pub fn new(dir: &Path) -> Self {
        RunLocks {
            path: dir.join("runs.lock"),
            file: Mutex::new(None),
            held: Mutex::new(HashSet::new()),
        }
    }

    /// Takes `slot` for this caller, or `Ok(None)` when another runner (a thread here or
    /// another process) holds it. The directory must exist.
    pub fn try_acquire(&self, slot: u64) -> Result<Option<RunSlot<'_>>, FileError> {
        if !self.held.lock().insert(slot) {
            return Ok(None);
        }
        let release_held = || {
            self.held.lock().remove(&slot);
        };
        let file = match self.file() {
            Ok(file) => file,
            Err(e) => {
                release_held();
                return Err(e);
            }
        };
        match set_lock(&file, slot, libc::F_WRLCK as libc::c_short) {
            Ok(true) => Ok(Some(RunSlot {
                locks: self,
                file,
                slot,
            })),
            Ok(false) => {
                release_held();
                Ok(None)
            }
            Err(e) => {
                release_held();
                Err(FileError::new("lock", &self.path, e))
            }
        }
    }

    /// Whether the lock file is open (its directory existed then).
    pub fn is_open(&self) -> bool {
        self.file.lock().is_some()
    }

    /// The shared description (the locks are the description's).
    fn file(&self) -> Result<Arc<File>, FileError> {
        let mut slot = self.file.lock();
        if slot.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o640)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&self.path)
                .map_err(|e| FileError::new("open", &self.path, e))?;
            *slot = Some(Arc::new(file));
        }
        Ok(slot.as_ref().expect("opened above").clone())
    }
}

impl Drop for RunSlot<'_> {
    fn drop(&mut self) {
        if let Err(e) = set_lock(&self.file, self.slot, libc::F_UNLCK as libc::c_short) {
            tracing::warn!(path = %self.locks.path.display(), error = %e, "run lock not released; it ends with the process");
        }
        self.locks.held.lock().remove(&self.slot);
    }
}

/// `F_OFD_SETLK` of one byte at `slot`: `Ok(false)` when another description holds it.
fn set_lock(file: &File, slot: u64, kind: libc::c_short) -> io::Result<bool> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = slot as libc::off_t;
    lock.l_len = 1;
    // l_pid must be 0 for OFD locks (zeroed above).
    loop {
        // SAFETY: fcntl on a descriptor `file` keeps open, with a pointer to a live,
        // initialised `flock` that the kernel only reads.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) => return Ok(false),
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_held_once_across_threads_and_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let here = RunLocks::new(dir.path());
        // Another `RunLocks` has its own description: it stands for another process.
        let there = RunLocks::new(dir.path());
        let held = here.try_acquire(7).unwrap().expect("free");
        assert!(
            here.try_acquire(7).unwrap().is_none(),
            "another thread here"
        );
        assert!(there.try_acquire(7).unwrap().is_none(), "another process");
        let other = there.try_acquire(8).unwrap().expect("another slot is free");
        drop(held);
        assert!(there.try_acquire(7).unwrap().is_some());
        drop(other);
        assert!(here.held.lock().is_empty(), "nothing kept once released");
    }
}
