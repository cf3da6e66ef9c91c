//! The file-based error log of C_API §6.
//!
//! Each recorded error appends `[<unix ms>] Error <code>: <message>\n` to
//! `<dir>/backup_error_<unix ms at creation>.log`. A line goes to the kernel in one
//! `write(2)` before the record call returns, so it survives the process being killed
//! (fsync happens at flush, for power loss). Files roll by size; the oldest files beyond
//! the count, over the whole directory, are deleted. Names are unique and increasing
//! across processes: a file is created exclusively, later than every name present, and a
//! taken name moves to the next millisecond.
//!
//! Several writers (processes, the plugin and coordinators) may share one directory. Each
//! holds a shared `flock` on the file it appends to; a pruner deletes a file only while it
//! holds an exclusive lock on it, so a live writer's file is never deleted under it.
//! Each record call makes one `statx` (the link count alone) of the open file, after it
//! started and before its line is handed over: a file (or its directory) removed by someone
//! else is noticed by the first line recorded after the removal, which goes to a new file
//! instead of an unlinked one. The check is the caller's, so that callers make it in
//! parallel, outside the writes that one process's lines take in turn. A write that fails
//! half-way is cut back to where its lines began, so every line is one whole record.
//!
//! Threads of one process recording at once share their writes: the first caller that
//! finds no write in progress leads, and writes every line handed over meanwhile in one
//! `write(2)` (one per file when the batch crosses a rotation); the others wait for it.
//! Formatting and the removal check are per thread, the hand-over one short critical
//! section, and every call still returns only once its own line is in the kernel. A
//! waiting caller first spins on atomics (a batch's write takes about a microsecond; falling
//! asleep and being woken costs several, and on few cores most of a caller's time): only a
//! caller whose batch is not done after that sleeps on the condvar, and a leader wakes
//! sleepers only when there are.

use crate::clock::Clock;
use parking_lot::{Condvar, Mutex, RwLock};
use rustix::fs::FlockOperation;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Weak};

const FILE_PREFIX: &str = "backup_error_";
const FILE_SUFFIX: &str = ".log";
/// One message never takes more than this in a line, the "..." of a cut included.
pub(crate) const MAX_MESSAGE_BYTES: usize = 4096;
const CUT_MARK: &str = "...";
/// A name further ahead of the clock than this (a year) is junk, not a writer's file: it
/// is not followed when choosing the next name (`backup_error_18446744073709551615.log`
/// would leave no name after it) and it is the first to go when pruning.
const FUTURE_NAME_LIMIT_MS: u64 = 366 * 24 * 60 * 60 * 1000;
/// Attempts at creating a new file before the line is given up (names taken by others,
/// a file pruned by another writer before this one could lock it).
const CREATE_ATTEMPTS: u32 = 1000;
const FILE_MODE: u32 = 0o640;
/// How long a caller waits for its batch before sleeping: rounds of busy-waiting, 64
/// `pause`s in all (about 4 us where a pause takes 60 ns; a batch's write takes about 1 us),
/// then a few rounds of yielding the core (the leader may be waiting for it), then sleep.
/// Longer spins waste the core when the leader is not running (a loaded machine).
const SPIN_ROUNDS: u32 = 20;
const YIELD_ROUNDS: u32 = 4;
const SPINS_PER_ROUND: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogSettings {
    pub dir: PathBuf,
    pub rotation_size: u64,
    pub rotation_count: u32,
}

impl LogSettings {
    /// What coordinators use: the default rotation of the plugin config.
    pub fn with_default_rotation(dir: PathBuf) -> Self {
        LogSettings {
            dir,
            rotation_size: 64 * 1024 * 1024,
            rotation_count: 30,
        }
    }
}

/// The file lines go to. Holding it holds a shared `flock` on it (released when dropped),
/// which is what keeps pruners, in this process and others, away from it.
struct ActiveFile {
    file: File,
    path: PathBuf,
    /// Set by a caller whose removal check found the file unlinked: the leader of the
    /// caller's batch (handed over after this was set) starts a new file.
    removed: AtomicBool,
}

/// What the log's lock guards: the current file and its size (this log is the file's only
/// writer, so the size it counts is the file's). Only the leader of a batch takes it on the
/// write path, so it is not contended there.
#[derive(Default)]
struct Active {
    current: Option<Arc<ActiveFile>>,
    size: u64,
    /// The generation of `checked` that shows `current`.
    generation: u64,
}

/// What callers check for removal: the current file, and a number that changes with it.
#[derive(Default)]
struct Checked {
    generation: u64,
    file: Option<Arc<ActiveFile>>,
}

/// Lines handed over by concurrent callers: the one that finds no batch being written
/// becomes the leader and writes every line gathered so far in one `write(2)`; the others
/// wait for it. Each call returns only once its own line was written (or failed).
#[derive(Default)]
struct Queue {
    /// Lines of the batch being gathered, back to back, and where each ends.
    lines: Vec<u8>,
    ends: Vec<usize>,
    /// Number of the batch being gathered.
    gathering: u64,
    /// A leader is writing a batch.
    writing: bool,
    /// Every batch numbered below this is done.
    done_below: u64,
    /// Failures of finished batches, until each of their followers has read them.
    failures: Vec<BatchFailures>,
    /// Buffers of the last batch, kept for their capacity.
    spare: (Vec<u8>, Vec<usize>),
    /// The oldest generation of `checked` that a caller of the gathering batch checked.
    oldest_check: Option<u64>,
    /// Callers asleep on `batch_done`.
    sleepers: usize,
}

struct BatchFailures {
    batch: u64,
    followers_left: usize,
    failed: Vec<(std::ops::Range<usize>, LogError)>,
}

/// Why a line was not written, with the file or directory it concerns.
#[derive(Debug, thiserror::Error)]
#[error("could not {action} {}: {source}", path.display())]
pub struct LogError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl LogError {
    fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        LogError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The same error for another caller of the batch it concerns.
    fn duplicate(&self) -> Self {
        let source = match self.source.raw_os_error() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::new(self.source.kind(), self.source.to_string()),
        };
        LogError::new(self.action, &self.path, source)
    }
}

pub struct ErrorLog {
    settings: LogSettings,
    active: Mutex<Active>,
    /// The file of `active`, for the callers' removal check (read-locked for one `statx`;
    /// write-locked only by a leader that changes the file, with `active` held).
    checked: CacheLine<RwLock<Checked>>,
    queue: CacheLine<Mutex<Queue>>,
    /// Signalled when a batch is done, if someone sleeps on it.
    batch_done: Condvar,
    progress: CacheLine<Progress>,
    /// The last name this log chose, so that its own names increase even within one ms.
    last_name_ms: AtomicU64,
    write_failures: AtomicU64,
}

/// Copies of the queue's `done_below`, `writing` and `failures.len()`, stored under its lock
/// and read without it by callers waiting for their batch: a caller that sees its batch done
/// and no failure pending is done without taking the lock again.
#[derive(Default)]
struct Progress {
    done_below: AtomicU64,
    writing: AtomicBool,
    pending_failures: AtomicUsize,
}

/// A value alone on its cache line(s): the words every caller touches (the queue's lock,
/// the current file's lock, what waiting callers spin on) do not slow each other down.
#[derive(Default)]
#[repr(align(128))]
struct CacheLine<T>(T);

impl<T> std::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Logs are shared per (directory, rotation): two writers in one process must not
/// rotate each other's files away.
static SHARED: LazyLock<Mutex<HashMap<LogSettings, Weak<ErrorLog>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl ErrorLog {
    /// The process's log for these settings; files are created at the first line.
    pub fn shared(settings: LogSettings) -> Arc<ErrorLog> {
        let mut shared = SHARED.lock();
        shared.retain(|_, weak| weak.strong_count() > 0);
        if let Some(log) = shared.get(&settings).and_then(Weak::upgrade) {
            return log;
        }
        let log = Arc::new(ErrorLog {
            settings: settings.clone(),
            active: Mutex::new(Active::default()),
            checked: CacheLine::default(),
            queue: CacheLine::default(),
            batch_done: Condvar::new(),
            progress: CacheLine::default(),
            last_name_ms: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
        });
        shared.insert(settings, Arc::downgrade(&log));
        log
    }

    pub fn settings(&self) -> &LogSettings {
        &self.settings
    }

    /// Lines that could not be written (reported through `tracing`, never to the caller).
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// The file lines currently go to, once one exists.
    pub fn current_path(&self) -> Option<PathBuf> {
        self.active.lock().current.as_ref().map(|a| a.path.clone())
    }

    /// Appends one line for an error recorded at `unix_ms`. A failure is counted and traced
    /// with the path it concerns; it never fails the caller.
    pub fn append(&self, clock: &dyn Clock, unix_ms: u64, code: i32, message: &str) {
        // The line is built in a per-thread buffer: no allocation on this hot path.
        let result = LINE_BUFFER.with(|buffer| {
            let mut line = buffer.borrow_mut();
            line.clear();
            write_line(&mut line, unix_ms, code, message);
            self.append_line(clock, line.as_bytes())
        });
        if let Err(err) = result {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                path = %err.path.display(),
                action = err.action,
                error = %err.source,
                "could not write the error log; the line is lost"
            );
        }
    }

    /// The removal check of a record call: whether the current file (if any) still has a
    /// name. A file found removed is marked so; the leader of this caller's batch starts a
    /// new one. Made before the line is handed over, after the call started. Returns the
    /// generation checked: a leader about to write to a later file (one installed after
    /// this check, but maybe created and removed before it) checks that file itself.
    fn check_removal(&self) -> Result<u64, LogError> {
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
    fn set_current(&self, active: &mut Active, file: Option<Arc<ActiveFile>>) {
        let mut checked = self.checked.write();
        checked.generation += 1;
        checked.file = file.clone();
        active.generation = checked.generation;
        active.current = file;
        active.size = 0;
    }

    /// Hands `line` to the batch being gathered and returns once it was written: as the
    /// leader that writes the batch, or as a follower that finds its batch done.
    fn append_line(&self, clock: &dyn Clock, line: &[u8]) -> Result<(), LogError> {
        let generation = self.check_removal()?;
        let mut queue = self.queue.lock();
        let batch = queue.gathering;
        queue.oldest_check = Some(queue.oldest_check.map_or(generation, |g| g.min(generation)));
        queue.lines.extend_from_slice(line);
        let end = queue.lines.len();
        queue.ends.push(end);
        let index = queue.ends.len() - 1;
        loop {
            if queue.done_below > batch {
                return self.follower_outcome(&mut queue, batch, index);
            }
            if !queue.writing {
                // Ours is the batch being gathered (an earlier one would be done).
                return self.lead(clock, queue, index);
            }
            drop(queue);
            if self.spin_until_done(batch)
                && self.progress.pending_failures.load(Ordering::Acquire) == 0
            {
                return Ok(());
            }
            queue = self.queue.lock();
            if queue.done_below > batch || !queue.writing {
                continue;
            }
            queue.sleepers += 1;
            self.batch_done.wait(&mut queue);
            queue.sleepers -= 1;
        }
    }

    /// Spins a while for `batch` to be done (true) or for no batch to be written (false:
    /// ours may need a leader), without the queue's lock.
    fn spin_until_done(&self, batch: u64) -> bool {
        for round in 0..SPIN_ROUNDS {
            if self.progress.done_below.load(Ordering::Acquire) > batch {
                return true;
            }
            if !self.progress.writing.load(Ordering::Acquire) {
                return false;
            }
            if round < SPIN_ROUNDS - YIELD_ROUNDS {
                for _ in 0..SPINS_PER_ROUND {
                    std::hint::spin_loop();
                }
            } else {
                // The leader may be waiting for this core (more threads than cores).
                std::thread::yield_now();
            }
        }
        self.progress.done_below.load(Ordering::Acquire) > batch
    }

    /// Writes the batch being gathered, which holds the leader's line at `index`.
    fn lead(
        &self,
        clock: &dyn Clock,
        mut queue: parking_lot::MutexGuard<'_, Queue>,
        index: usize,
    ) -> Result<(), LogError> {
        let batch = queue.gathering;
        queue.gathering += 1;
        queue.writing = true;
        self.progress.writing.store(true, Ordering::Release);
        let spare = std::mem::take(&mut queue.spare);
        let lines = std::mem::replace(&mut queue.lines, spare.0);
        let ends = std::mem::replace(&mut queue.ends, spare.1);
        let oldest_check = queue.oldest_check.take().unwrap_or(0);
        drop(queue);
        // Whatever happens (a panic included), the batch ends and its followers wake.
        let mut finish = FinishBatch {
            log: self,
            batch,
            followers: ends.len() - 1,
            failed: Vec::new(),
            buffers: None,
        };
        self.write_batch(clock, &lines, &ends, oldest_check, &mut finish.failed);
        let own = finish
            .failed
            .iter()
            .find(|(range, _)| range.contains(&index))
            .map(|(_, err)| err.duplicate());
        finish.buffers = Some((lines, ends));
        drop(finish);
        own.map_or(Ok(()), Err)
    }

    /// Writes whole lines, as many as fit in the current file in each `write(2)`; notes in
    /// `failed` the lines that were not written and why.
    fn write_batch(
        &self,
        clock: &dyn Clock,
        lines: &[u8],
        ends: &[usize],
        oldest_check: u64,
        failed: &mut Vec<(std::ops::Range<usize>, LogError)>,
    ) {
        let mut active = self.active.lock();
        // A caller of this batch found the file removed (the mark was set before its line
        // was handed over): every line of the batch goes to a new file. A file installed
        // since some caller's check is checked here, once: all the lines were handed over.
        if let Some(file) = &active.current {
            let removed = file.removed.load(Ordering::Acquire)
                || (active.generation > oldest_check
                    && match is_unlinked(&file.file) {
                        Ok(removed) => removed,
                        Err(e) => {
                            failed.push((0..ends.len(), LogError::new("stat", &file.path, e)));
                            return;
                        }
                    });
            if removed {
                self.set_current(&mut active, None);
            }
        }
        let mut first = 0;
        while first < ends.len() {
            let begin = if first == 0 { 0 } else { ends[first - 1] };
            let fits = |active: &Active, end: usize| {
                active.size.saturating_add((end - begin) as u64) <= self.settings.rotation_size
            };
            if active.current.is_none() || (active.size > 0 && !fits(&active, ends[first])) {
                // Our lock on the old file goes first, so that the pruning done for the new
                // file may take the old one when it is beyond the count.
                self.set_current(&mut active, None);
                match self.create_file(clock) {
                    Ok(file) => self.set_current(&mut active, Some(Arc::new(file))),
                    Err(err) => {
                        // Each line tries again, as it would have alone.
                        failed.push((first..first + 1, err));
                        first += 1;
                        continue;
                    }
                }
            }
            // The lines that fit, the first one always (an empty file takes any line).
            let mut last = first + 1;
            while last < ends.len() && fits(&active, ends[last]) {
                last += 1;
            }
            let chunk = &lines[begin..ends[last - 1]];
            let start = active.size;
            let file = active.current.as_ref().expect("a file is open");
            if let Err(source) = write_whole(&file.file, chunk) {
                // Whatever part of the lines went in is cut back: the next line must not be
                // glued to a torn one.
                let torn =
                    rustix::fs::fstat(&file.file).map_or(true, |s| s.st_size as u64 != start);
                let err = LogError::new("append a line to", &file.path, source);
                if torn {
                    if let Err(e) = file.file.set_len(start) {
                        // The partial bytes stay: never append to them, start a new file.
                        tracing::warn!(path = %file.path.display(), error = %e,
                            "could not cut a torn line from the error log; the next line starts a new file");
                        self.set_current(&mut active, None);
                    }
                }
                failed.push((first..last, err));
            } else {
                active.size += chunk.len() as u64;
            }
            first = last;
        }
    }

    /// fsync of the current file (cleanup, and before a planned exit).
    pub fn flush(&self) {
        if let Some(active) = self.active.lock().current.as_ref() {
            if let Err(err) = active.file.sync_data() {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %active.path.display(), error = %err, "could not fsync the error log");
            }
        }
    }

    fn create_file(&self, clock: &dyn Clock) -> Result<ActiveFile, LogError> {
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

/// Ends a batch: marks it done, leaves its failures for its followers, wakes them.
struct FinishBatch<'a> {
    log: &'a ErrorLog,
    batch: u64,
    followers: usize,
    failed: Vec<(std::ops::Range<usize>, LogError)>,
    /// The batch's buffers, returned for their capacity (`None` after a panic).
    buffers: Option<(Vec<u8>, Vec<usize>)>,
}

impl Drop for FinishBatch<'_> {
    fn drop(&mut self) {
        let mut queue = self.log.queue.lock();
        queue.writing = false;
        queue.done_below = self.batch + 1;
        if let Some((mut lines, mut ends)) = self.buffers.take() {
            lines.clear();
            ends.clear();
            queue.spare = (lines, ends);
        } else if self.failed.is_empty() {
            // A panic before the batch was written: its lines are lost; say so.
            self.failed.push((
                0..usize::MAX,
                LogError::new(
                    "write a batch of lines to",
                    &self.log.settings.dir,
                    io::Error::other("internal error while writing"),
                ),
            ));
        }
        if !self.failed.is_empty() && self.followers > 0 {
            queue.failures.push(BatchFailures {
                batch: self.batch,
                followers_left: self.followers,
                failed: std::mem::take(&mut self.failed),
            });
        }
        // The failures first: a follower that sees its batch done reads them next.
        let log = self.log;
        log.progress
            .pending_failures
            .store(queue.failures.len(), Ordering::Release);
        log.progress
            .done_below
            .store(queue.done_below, Ordering::Release);
        log.progress.writing.store(false, Ordering::Release);
        let sleepers = queue.sleepers > 0;
        drop(queue);
        if sleepers {
            log.batch_done.notify_all();
        }
    }
}

impl ErrorLog {
    /// How the line at `index` of a finished `batch` went, for a follower.
    fn follower_outcome(
        &self,
        queue: &mut Queue,
        batch: u64,
        index: usize,
    ) -> Result<(), LogError> {
        let Some(at) = queue.failures.iter().position(|f| f.batch == batch) else {
            return Ok(());
        };
        let failures = &mut queue.failures[at];
        let own = failures
            .failed
            .iter()
            .find(|(range, _)| range.contains(&index))
            .map(|(_, err)| err.duplicate());
        failures.followers_left -= 1;
        if failures.followers_left == 0 {
            queue.failures.swap_remove(at);
            self.progress
                .pending_failures
                .store(queue.failures.len(), Ordering::Release);
        }
        own.map_or(Ok(()), Err)
    }
}

/// Whether the open file has no name left (removed, or its directory was). A `statx` asking
/// for the link count alone: on ext4 it costs a third of a full `fstat`, which computes the
/// block count too.
fn is_unlinked(file: &File) -> io::Result<bool> {
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
fn write_whole(mut file: &File, line: &[u8]) -> io::Result<()> {
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

thread_local! {
    static LINE_BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `[<unix ms>] Error <code>: <message>\n`; control characters become spaces so that one
/// record is always one line, and an oversized message is cut.
pub fn format_line(unix_ms: u64, code: i32, message: &str) -> String {
    let mut line = String::with_capacity(32 + message.len().min(MAX_MESSAGE_BYTES));
    write_line(&mut line, unix_ms, code, message);
    line
}

fn write_line(line: &mut String, unix_ms: u64, code: i32, message: &str) {
    use std::fmt::Write as _;
    let _ = write!(line, "[{unix_ms}] Error {code}: ");
    line.push_str(&sanitize_message(message));
    line.push('\n');
}

/// One line of text of at most `MAX_MESSAGE_BYTES`: control characters become spaces, the
/// end is cut (with "..."). Applying it twice changes nothing. Borrows when the message is
/// already clean (the common case). Secrets must be redacted *before* this, on the raw text.
pub fn sanitize_message(message: &str) -> Cow<'_, str> {
    if message.len() <= MAX_MESSAGE_BYTES
        && !message.bytes().any(|b| b.is_ascii_control() || b >= 0x80)
    {
        return Cow::Borrowed(message);
    }
    let fits = message.len() <= MAX_MESSAGE_BYTES;
    if fits && !message.chars().any(char::is_control) {
        return Cow::Borrowed(message);
    }
    let budget = if fits {
        MAX_MESSAGE_BYTES
    } else {
        MAX_MESSAGE_BYTES - CUT_MARK.len()
    };
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE_BYTES));
    for ch in message.chars() {
        if out.len() + ch.len_utf8() > budget {
            break;
        }
        out.push(if ch.is_control() { ' ' } else { ch });
    }
    if !fits {
        out.push_str(CUT_MARK);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::os::unix::fs::MetadataExt;

    fn settings(dir: &Path, size: u64, count: u32) -> LogSettings {
        LogSettings {
            dir: dir.to_path_buf(),
            rotation_size: size,
            rotation_count: count,
        }
    }

    #[test]
    fn lines_have_the_contract_format() {
        assert_eq!(
            format_line(17, -6, "Network error"),
            "[17] Error -6: Network error\n"
        );
        assert_eq!(format_line(1, -1, "a\nb\rc"), "[1] Error -1: a b c\n");
        let long = "x".repeat(10_000);
        let line = format_line(1, -1, &long);
        assert!(line.len() < 4200 && line.ends_with("...\n"));
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

    #[test]
    fn sanitizing_bounds_the_message_and_is_idempotent() {
        for len in [4095, 4096, 4097, 10_000] {
            let text = format!("{}\t{}", "é".repeat(len / 2), "x".repeat(len / 2));
            let once = sanitize_message(&text).into_owned();
            assert!(once.len() <= MAX_MESSAGE_BYTES, "{len}: {}", once.len());
            assert!(!once.contains('\t'));
            assert_eq!(sanitize_message(&once), once);
        }
    }

    #[test]
    fn a_line_recorded_after_a_removal_lands_in_a_new_file_while_other_threads_write() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("errors");
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(&dir, 1 << 30, 1000));
        let stop = std::sync::atomic::AtomicBool::new(false);
        // The busy threads stop also when an assertion fails, so that a failure ends the test.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        std::thread::scope(|s| {
            let _stop = StopOnDrop(&stop);
            for t in 0..4 {
                let (log, clock, stop) = (&log, &clock, &stop);
                s.spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        log.append(clock, clock.unix_ms(), -6, &format!("busy {t} {i}"));
                        i += 1;
                    }
                });
            }
            for round in 0..50 {
                log.append(&clock, clock.unix_ms(), -6, "before");
                // The busy threads may make the directory again meanwhile: remove until gone.
                let mut tries = 0;
                while let Err(e) = fs::remove_dir_all(&dir) {
                    tries += 1;
                    assert!(tries < 1000, "cannot remove {}: {e}", dir.display());
                }
                // Batched with other threads' lines or not, the line must be on disk now.
                let marker = format!("marker {round}");
                log.append(&clock, clock.unix_ms(), -6, &marker);
                let found = log_files(&dir).unwrap().iter().any(|(_, path)| {
                    fs::read_to_string(path)
                        .unwrap()
                        .lines()
                        .any(|l| l.ends_with(&marker))
                });
                assert!(
                    found,
                    "round {round}: {marker} was written to a removed file"
                );
            }
        });
        assert_eq!(log.write_failures(), 0);
    }

    #[test]
    fn threads_rolling_one_log_lose_and_glue_no_line() {
        let root = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000);
        let log = ErrorLog::shared(settings(root.path(), 4096, 10_000));
        std::thread::scope(|s| {
            for t in 0..8 {
                let (log, clock) = (&log, &clock);
                s.spawn(move || {
                    for i in 0..500 {
                        log.append(
                            clock,
                            clock.unix_ms(),
                            -6,
                            &format!("thread {t} line {i:03}"),
                        );
                    }
                });
            }
        });
        assert_eq!(log.write_failures(), 0);
        let mut seen = std::collections::HashSet::new();
        for (_, path) in log_files(root.path()).unwrap() {
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.len() <= 4096 && text.ends_with('\n'));
            for line in text.lines() {
                let message = line.strip_prefix("[1000] Error -6: ").unwrap();
                assert!(seen.insert(message.to_string()), "{message} twice");
            }
        }
        assert_eq!(seen.len(), 8 * 500);
    }
}
