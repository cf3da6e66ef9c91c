//! The files: named `backup_error_<unix ms>.log`, increasing across processes, created
//! exclusively 0640 and held with a shared `flock`; the current file and the callers' check
//! that it still has a name; pruning the oldest files beyond the count, never one a live
//! writer holds.

use super::{ErrorLog, LogError};
use crate::clock::Clock;
use rustix::fs::FlockOperation;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const FILE_PREFIX: &str = "backup_error_";
const FILE_SUFFIX: &str = ".log";
/// A name further ahead of the clock than this (a year) is junk, not a writer's file: it
/// is not followed when choosing the next name (`backup_error_18446744073709551615.log`
/// would leave no name after it) and it is the first to go when pruning.
const FUTURE_NAME_LIMIT_MS: u64 = 366 * 24 * 60 * 60 * 1000;
/// Attempts at creating a new file before the line is given up (names taken by others,
/// a file pruned by another writer before this one could lock it).
const CREATE_ATTEMPTS: u32 = 1000;
const FILE_MODE: u32 = 0o640;

/// The file lines go to. Holding it holds a shared `flock` on it (released when dropped),
/// which is what keeps pruners, in this process and others, away from it.
pub(super) struct ActiveFile {
    pub(super) file: File,
    pub(super) path: PathBuf,
    /// Set by a caller whose removal check found the file unlinked: the leader of the
    /// caller's batch (handed over after this was set) starts a new file.
    pub(super) removed: AtomicBool,
}

/// What the log's lock guards: the current file and its size (this log is the file's only
/// writer, so the size it counts is the file's). Only the leader of a batch takes it on the
/// write path, so it is not contended there.
#[derive(Default)]
pub(super) struct Active {
    pub(super) current: Option<Arc<ActiveFile>>,
    pub(super) size: u64,
    /// The generation of `checked` that shows `current`.
    pub(super) generation: u64,
}

/// What callers check for removal: the current file, and a number that changes with it.
#[derive(Default)]
pub(super) struct Checked {
    generation: u64,
    file: Option<Arc<ActiveFile>>,
}

impl ErrorLog {
    /// The removal check of a record call: whether the current file (if any) still has a
    /// name. A file found removed is marked so; the leader of this caller's batch starts a
    /// new one. Made before the line is handed over, after the call started. Returns the
    /// generation checked: a leader about to write to a later file (one installed after
    /// this check, but maybe created and removed before it) checks that file itself.
    pub(super) fn check_removal(&self) -> Result<u64, LogError> {
        let checked = self.checked.read();
        let Some(file) = checked.file.as_ref() else {
            return Ok(checked.generation);
        };
        if file.removed.load(Ordering::Acquire) {
            return Ok(checked.generation);
        }
        match is_unlinked(&file.file) {
            Ok(false) => {}
            Ok(true) => {
                if !file.removed.swap(true, Ordering::AcqRel) {
                    tracing::warn!(path = %file.path.display(),
                        "the error log file was removed; the next line starts a new file");
                }
            }
            Err(e) => return Err(LogError::new("stat", &file.path, e)),
        }
        Ok(checked.generation)
    }

    /// Makes `file` the file lines go to (`None`: none until the next line), for the
    /// leader and for the callers' removal check.
    pub(super) fn set_current(&self, active: &mut Active, file: Option<Arc<ActiveFile>>) {
        let mut checked = self.checked.write();
        checked.generation += 1;
        checked.file = file.clone();
        active.generation = checked.generation;
        active.current = file;
        active.size = 0;
    }

    pub(super) fn create_file(&self, clock: &dyn Clock) -> Result<ActiveFile, LogError> {
        let dir = &self.settings.dir;
        let now = clock.unix_ms();
        let mut last_error = None;
        let mut name_ms = 0;
        for _ in 0..CREATE_ATTEMPTS {
            // Another writer or an operator may remove the directory at any point here
            // (`rm -rf` racing a rotation): a step that finds it gone starts over.
            if !dir.is_dir() {
                match crate::durable::create_private_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.source.kind() == io::ErrorKind::NotFound => {
                        last_error = Some(LogError::new("create the directory", dir, e.source));
                        continue;
                    }
                    Err(e) => return Err(LogError::new("create the directory", dir, e.source)),
                }
            }
            if name_ms == 0 {
                let files = match log_files(dir) {
                    Ok(files) => files,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        last_error = Some(LogError::new("list", dir, e));
                        continue;
                    }
                    Err(e) => return Err(LogError::new("list", dir, e)),
                };
                let newest = files
                    .iter()
                    .rev()
                    .map(|(ms, _)| *ms)
                    .find(|ms| !is_from_the_far_future(*ms, now))
                    .unwrap_or(0);
                name_ms = now
                    .max(newest.saturating_add(1))
                    .max(self.last_name_ms.load(Ordering::Relaxed).saturating_add(1));
            }
            let path = dir.join(format!("{FILE_PREFIX}{name_ms}{FILE_SUFFIX}"));
            match open_locked(&path) {
                Ok(Some(file)) => {
                    self.last_name_ms.store(name_ms, Ordering::Relaxed);
                    self.prune(&path, now);
                    return Ok(ActiveFile {
                        file,
                        path,
                        removed: AtomicBool::new(false),
                    });
                }
                // Taken, or pruned by another writer before we could lock it: next name.
                Ok(None) => name_ms = name_ms.saturating_add(1),
                // The directory went away between the check and the open: make it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    last_error = Some(LogError::new("create", &path, e))
                }
                Err(e) => return Err(LogError::new("create", &path, e)),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            LogError::new(
                "find a free name for a new file in",
                dir,
                io::Error::from(io::ErrorKind::AlreadyExists),
            )
        }))
    }

    /// Deletes the oldest files beyond the count, never the one just created, and never a
    /// file a live writer holds (its shared lock makes our exclusive try fail).
    fn prune(&self, keep: &Path, now: u64) {
        let Ok(mut files) = log_files(&self.settings.dir) else {
            return;
        };
        // Junk names from the far future are the first to go, not the newest files.
        files.sort_by_key(|(ms, _)| (!is_from_the_far_future(*ms, now), *ms));
        let excess = files
            .len()
            .saturating_sub(self.settings.rotation_count as usize);
        for (_, path) in files.into_iter().take(excess) {
            if path != keep {
                match remove_if_unlocked(&path) {
                    Ok(true) => {}
                    Ok(false) => tracing::debug!(path = %path.display(),
                        "an old error log is still written by a live writer; kept"),
                    Err(err) => tracing::warn!(path = %path.display(), error = %err,
                        "could not delete an old error log"),
                }
            }
        }
    }
}

/// Whether the open file has no name left (removed, or its directory was). A `statx` asking
/// for the link count alone: on ext4 it costs a third of a full `fstat`, which computes the
/// block count too.
pub(super) fn is_unlinked(file: &File) -> io::Result<bool> {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    match statx(file, c"", AtFlags::EMPTY_PATH, StatxFlags::NLINK) {
        Ok(stat) if stat.stx_mask & StatxFlags::NLINK.bits() != 0 => Ok(stat.stx_nlink == 0),
        // No statx (kernels before 4.11, some sandboxes), or no link count from it.
        Ok(_) | Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM) => {
            Ok(rustix::fs::fstat(file)?.st_nlink == 0)
        }
        Err(e) => Err(e.into()),
    }
}

fn is_from_the_far_future(name_ms: u64, now: u64) -> bool {
    name_ms > now.saturating_add(FUTURE_NAME_LIMIT_MS)
}

/// One `write(2)` for the whole line in every sane case; a short write (a disk filling up)
/// continues, and any failure reports how it ended, so the caller can cut the line back.
pub(super) fn write_whole(mut file: &File, line: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < line.len() {
        match file.write(&line[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates `path` exclusively (0640, append-only, no symlink followed) and takes the
/// shared lock a writer holds. `None`: the name is taken, or a pruner removed the file
/// between its creation and our lock.
fn open_locked(path: &Path) -> io::Result<Option<File>> {
    let file = match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(e),
    };
    // The umask may have taken bits away; the contract says 0640.
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    // Never blocks: a pruner holds its exclusive lock only to unlink the file.
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    if rustix::fs::fstat(&file)?.st_nlink == 0 {
        return Ok(None);
    }
    Ok(Some(file))
}

/// Unlinks a log file unless a writer holds it. `Ok(false)`: kept, a writer has it.
fn remove_if_unlocked(path: &Path) -> io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        // Not a file a writer could hold (a symlink, a fifo...): only the name goes.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            fs::remove_file(path)?;
            return Ok(true);
        }
        Err(e) => return Err(e),
    };
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    // The name must still be the file we locked (not one made after it was deleted).
    let locked = file.metadata()?;
    match fs::symlink_metadata(path) {
        Ok(named) if named.ino() == locked.ino() && named.dev() == locked.dev() => {
            fs::remove_file(path)?;
        }
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The lock goes with `file`, after the unlink.
    Ok(true)
}

/// The log files of a directory, oldest first.
pub fn log_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(ms) = name
            .to_str()
            .and_then(|n| n.strip_prefix(FILE_PREFIX))
            .and_then(|n| n.strip_suffix(FILE_SUFFIX))
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        files.push((ms, entry.path()));
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::super::LogSettings;
    use super::*;
    use crate::clock::ManualClock;

    fn settings(dir: &Path, size: u64, count: u32) -> LogSettings {
        LogSettings {
            dir: dir.to_path_buf(),
            rotation_size: size,
            rotation_count: count,
        }
    }

    #[test]
    fn creates_directory_and_file_with_the_contract_modes() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("errors");
        let clock = ManualClock::new(1_700_000_000_000);
        let log = ErrorLog::shared(settings(&dir, 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -6, "Network error");
        log.append(&clock, clock.unix_ms(), -5, "File I/O error");
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o750);
        let files = log_files(&dir).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, 1_700_000_000_000);
        assert_eq!(fs::metadata(&files[0].1).unwrap().mode() & 0o777, 0o640);
        assert_eq!(
            fs::read_to_string(&files[0].1).unwrap(),
            "[1700000000000] Error -6: Network error\n[1700000000000] Error -5: File I/O error\n"
        );
        assert_eq!(log.write_failures(), 0);
    }

    #[test]
    fn rolls_by_size_and_keeps_the_newest_files() {
        let root = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(root.path(), 100, 3));
        for i in 0..40 {
            log.append(
                &clock,
                clock.unix_ms(),
                -6,
                &format!("failure number {i:04}"),
            );
        }
        let files = log_files(root.path()).unwrap();
        assert_eq!(files.len(), 3);
        // Names increase even though the clock stood still.
        assert!(files.windows(2).all(|w| w[0].0 < w[1].0));
        for (_, path) in &files {
            let len = fs::metadata(path).unwrap().len();
            assert!(len <= 100, "{} is {len} bytes", path.display());
        }
        let last = fs::read_to_string(&files[2].1).unwrap();
        assert!(last.ends_with("failure number 0039\n"));
    }

    #[test]
    fn names_move_past_files_of_other_processes() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("backup_error_5000.log"), "").unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(root.path(), 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -1, "x");
        let names: Vec<u64> = log_files(root.path())
            .unwrap()
            .into_iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(names, vec![5000, 5001]);
    }

    #[test]
    fn a_symlink_in_place_of_the_file_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, root.path().join("backup_error_1000.log")).unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(root.path(), 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -1, "x");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(log
            .current_path()
            .unwrap()
            .ends_with("backup_error_1001.log"));
    }

    #[test]
    fn an_unwritable_directory_is_counted_not_raised() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("plain-file");
        fs::write(&file, "").unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(&file.join("sub"), 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -1, "x");
        assert_eq!(log.write_failures(), 1);
    }

    #[test]
    fn a_removed_directory_is_noticed_at_the_next_line() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("errors");
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(&dir, 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -6, "before");
        fs::remove_dir_all(&dir).unwrap();
        clock.advance(std::time::Duration::from_millis(5));
        log.append(&clock, clock.unix_ms(), -6, "after");
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o750);
        let files = log_files(&dir).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(
            fs::read_to_string(&files[0].1).unwrap(),
            "[1005] Error -6: after\n"
        );
        // A removed file alone (logrotate's way) is noticed the same.
        fs::remove_file(&files[0].1).unwrap();
        log.append(&clock, clock.unix_ms(), -6, "again");
        let files = log_files(&dir).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(
            fs::read_to_string(&files[0].1).unwrap(),
            "[1005] Error -6: again\n"
        );
        assert_eq!(log.write_failures(), 0);
    }

    #[test]
    fn a_name_from_the_far_future_neither_wraps_nor_is_followed() {
        let root = tempfile::tempdir().unwrap();
        let absurd = root.path().join(format!("backup_error_{}.log", u64::MAX));
        fs::write(&absurd, "junk\n").unwrap();
        let clock = ManualClock::new(1_700_000_000_000);
        let log = ErrorLog::shared(settings(root.path(), 40, 2));
        for i in 0..4 {
            log.append(&clock, clock.unix_ms(), -1, &format!("line {i}"));
        }
        assert_eq!(log.write_failures(), 0);
        let names: Vec<u64> = log_files(root.path())
            .unwrap()
            .into_iter()
            .map(|f| f.0)
            .collect();
        // Names went on from the clock, increasing; the junk went first when pruning.
        assert_eq!(names, vec![1_700_000_000_002, 1_700_000_000_003]);
        assert!(!absurd.exists());
    }

    #[test]
    fn a_far_but_plausible_name_is_followed() {
        let root = tempfile::tempdir().unwrap();
        let ahead: u64 = 1_700_000_000_000 + 30 * 24 * 3600 * 1000;
        fs::write(root.path().join(format!("backup_error_{ahead}.log")), "").unwrap();
        let clock = ManualClock::new(1_700_000_000_000);
        let log = ErrorLog::shared(settings(root.path(), 1 << 20, 30));
        log.append(&clock, clock.unix_ms(), -1, "x");
        assert!(log
            .current_path()
            .unwrap()
            .ends_with(format!("backup_error_{}.log", ahead + 1)));
    }

    #[test]
    fn a_file_a_live_writer_holds_is_not_pruned() {
        let root = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000);
        // Another writer of this process with other settings, as a coordinator beside the plugin.
        let quiet = ErrorLog::shared(settings(root.path(), 1 << 20, 30));
        quiet.append(&clock, clock.unix_ms(), -5, "quiet writer's newest line");
        let busy = ErrorLog::shared(settings(root.path(), 64, 2));
        for i in 0..50 {
            busy.append(&clock, clock.unix_ms(), -6, &format!("busy line {i:03}"));
        }
        let quiet_path = quiet.current_path().unwrap();
        assert!(fs::read_to_string(&quiet_path)
            .unwrap()
            .contains("quiet writer's newest line"));
        // Only the live writer's file is kept beyond the count.
        assert_eq!(log_files(root.path()).unwrap().len(), 3);
        quiet.append(&clock, clock.unix_ms(), -5, "and the next one");
        assert!(fs::read_to_string(&quiet_path)
            .unwrap()
            .ends_with("and the next one\n"));
        // Once the writer is gone, its file ages out by the count.
        drop(quiet);
        for i in 0..10 {
            busy.append(&clock, clock.unix_ms(), -6, &format!("more {i:03}"));
        }
        assert!(!quiet_path.exists());
        assert_eq!(log_files(root.path()).unwrap().len(), 2);
    }
}
