//! Threads of one process recording at once share their writes: the first caller that
//! finds no write in progress leads and writes every line handed over meanwhile (one
//! `write(2)` per file), the others spin, then sleep, until their batch is done.

use super::files::{is_unlinked, write_whole, Active};
use super::{ErrorLog, LogError};
use crate::clock::Clock;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// How long a caller waits for its batch before sleeping: rounds of busy-waiting, 64
/// `pause`s in all (about 4 us where a pause takes 60 ns; a batch's write takes about 1 us),
/// then a few rounds of yielding the core (the leader may be waiting for it), then sleep.
/// Longer spins waste the core when the leader is not running (a loaded machine).
const SPIN_ROUNDS: u32 = 20;
const YIELD_ROUNDS: u32 = 4;
const SPINS_PER_ROUND: u32 = 4;

/// Lines handed over by concurrent callers: the one that finds no batch being written
/// becomes the leader and writes every line gathered so far in one `write(2)`; the others
/// wait for it. Each call returns only once its own line was written (or failed).
#[derive(Default)]
pub(super) struct Queue {
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

/// Copies of the queue's `done_below`, `writing` and `failures.len()`, stored under its lock
/// and read without it by callers waiting for their batch: a caller that sees its batch done
/// and no failure pending is done without taking the lock again.
#[derive(Default)]
pub(super) struct Progress {
    done_below: AtomicU64,
    writing: AtomicBool,
    pending_failures: AtomicUsize,
}

impl ErrorLog {
    /// Hands `line` to the batch being gathered and returns once it was written: as the
    /// leader that writes the batch, or as a follower that finds its batch done.
    pub(super) fn append_line(&self, clock: &dyn Clock, line: &[u8]) -> Result<(), LogError> {
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

#[cfg(test)]
mod tests {
    use super::super::{log_files, LogSettings};
    use super::*;
    use crate::clock::ManualClock;
    use std::fs;
    use std::path::Path;

    fn settings(dir: &Path, size: u64, count: u32) -> LogSettings {
        LogSettings {
            dir: dir.to_path_buf(),
            rotation_size: size,
            rotation_count: count,
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
