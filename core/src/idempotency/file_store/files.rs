//! The file-system calls the store needs beyond `std`, through `rustix` (no `unsafe`),
//! but `sync_file_range`, which `rustix` does not have.

use crate::durable::FileError;
use rustix::fs::{fadvise, fallocate, flock, Advice, FallocateFlags, FlockOperation};
use rustix::io::Errno;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// Bytes of a side file (a compaction's new journal, an index image) written at a time,
/// and written out to the disk before the next: the callers' `fdatasync` of the journal
/// then never waits for much of it (on ext4 a commit waits for the data of every file
/// allocated since the last one: hundreds of MB of side file written at once stalled the
/// callers' fsyncs for a second, 8 MB at a time still for tens of ms at 10 M keys).
pub(super) const SYNC_EVERY: u64 = 1 << 20;

/// Counts bytes written to a side file and writes them out every [`SYNC_EVERY`].
#[derive(Default)]
pub(super) struct Paced {
    unsynced: u64,
}

impl Paced {
    /// The data only, with `sync_file_range`: an `fdatasync` each time would also commit
    /// the file system's journal, and callers' fsyncs queue behind each commit. What makes
    /// the file durable (its size, its blocks) is the `fdatasync` its writer makes before
    /// it is renamed into place.
    pub(super) fn wrote(&mut self, file: &File, bytes: usize) -> io::Result<()> {
        self.unsynced += bytes as u64;
        if self.unsynced >= SYNC_EVERY {
            write_out(file)?;
            self.unsynced = 0;
        }
        Ok(())
    }
}

/// Writes a file's dirty pages to the disk and waits for them.
fn write_out(file: &File) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    loop {
        // SAFETY: a plain system call on a descriptor `file` keeps open; offset 0 and
        // length 0 name the whole file; no memory is passed.
        let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) };
        if rc == 0 {
            return Ok(());
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::Interrupted => continue,
            // A file system without it: the full sync does.
            e if e.raw_os_error() == Some(libc::ENOSYS)
                || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                return file.sync_data()
            }
            e => return Err(e),
        }
    }
}

/// An exclusive `flock`, released on drop.
pub(super) struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    /// Takes the lock, waiting for it when `wait`; `Ok(None)`: held elsewhere (not waiting).
    pub(super) fn acquire(
        file: &'a File,
        path: &Path,
        wait: bool,
    ) -> Result<Option<Self>, FileError> {
        let op = if wait {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        loop {
            match flock(file, op) {
                Ok(()) => return Ok(Some(FileLock(file))),
                Err(Errno::INTR) => continue,
                Err(Errno::WOULDBLOCK) if !wait => return Ok(None),
                Err(e) => return Err(FileError::new("lock", path, io::Error::from(e))),
            }
        }
    }

    /// Leaves the lock held after the guard, for the next transaction of this process.
    pub(super) fn keep(self) {
        std::mem::forget(self);
    }

    /// The guard of a lock that [`FileLock::keep`] left held.
    pub(super) fn kept(file: &'a File) -> Self {
        FileLock(file)
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        // Unlocking cannot fail in a way worth reporting; closing would unlock too.
        let _ = flock(self.0, FlockOperation::Unlock);
    }
}

pub(super) fn open_rw(path: &Path) -> Result<File, FileError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| FileError::new("open", path, e))
}

/// Tells the kernel that a journal is read at random offsets (each call reads its key's
/// record back, under the store's mutex): a page-cache miss then reads that page only,
/// not a readahead window that the cached pages before it suggest. Scans read 4 MB at a
/// time and need no readahead. Only advice: a kernel that ignores it changes nothing.
pub(super) fn advise_random(file: &File) {
    let _ = fadvise(file, 0, None, Advice::Random);
}

/// A new, empty side file at `path` (a compaction's new journal, an index image), 0640,
/// no symlink followed; what a dead writer left there is removed first.
pub(super) fn create_fresh(path: &Path) -> Result<File, FileError> {
    let _ = std::fs::remove_file(path);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| FileError::new("create", path, e))
}

/// Allocates `len` bytes from `offset` without changing the file's size. `Ok(false)`:
/// the file system cannot reserve room (the store then works without a reservation).
pub(super) fn reserve(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    loop {
        match fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) => return Ok(true),
            Err(Errno::INTR) => continue,
            Err(Errno::OPNOTSUPP) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The file at `path` if there is one, to be emptied by [`free_gradually`] once replaced.
pub(super) fn open_replaced(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()
}

/// Bytes of a replaced file freed at a time, and the pause after each.
const FREE_STEP: u64 = 16 << 20;
const FREE_PAUSE: Duration = Duration::from_millis(10);

/// Frees the blocks of a file that was replaced (no longer linked, still open) a slice at
/// a time from its end. The file system frees a file's blocks (and, mounted with
/// `discard`, trims them) in the journal commit that every caller's `fdatasync` waits for:
/// a journal of a GB dropped at once held callers for tens of ms. Nobody reads it any
/// more: a process that still has it open finds it unlinked (`nlink` 0) under the
/// journal's lock before it reads, and reads the file in its place. A file still linked
/// is left alone.
pub(super) fn free_gradually(file: &File) {
    let Ok(meta) = file.metadata() else {
        return;
    };
    if meta.nlink() != 0 {
        return;
    }
    let mut len = meta.len();
    while len > 0 {
        len = len.saturating_sub(FREE_STEP);
        if file.set_len(len).is_err() {
            return;
        }
        std::thread::sleep(FREE_PAUSE);
    }
}
