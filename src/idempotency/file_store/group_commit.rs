//! Group commit: callers that append at about the same time share one `fdatasync`, and
//! one caller runs the transactions queued meanwhile (combining).
//!
//! Each transaction is queued as a [`Request`]. The caller that takes the store's mutex
//! runs every queued request in turn, under one hold of the journal's lock and one
//! catch-up, and leaves each caller asleep until the fsync that covers its records: a
//! caller sleeps and wakes once per transaction, and the callers an fsync released do
//! not hand the mutex on to each other, a wake-up each, before the next fsync can start.

use super::files::FileLock;
use super::{FileStore, Inner, SyncPoint, SyncState, Txn, MAX_GATHER, MAX_KEPT};
use crate::durable::FileError;
use crate::error::Failure;
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::{self, Thread};
use std::time::Instant;

/// Queued, for whichever caller holds the store's mutex to run.
const QUEUED: u8 = 0;
/// Taken by a caller that runs it now.
const TAKEN: u8 = 1;
/// Appended; asleep until an fsync covers it.
const ASLEEP: u8 = 2;
/// Durable (or a transaction that failed): the caller returns without the mutex.
const SETTLED: u8 = 3;
/// The caller looks again under the sync mutex (an fsync failed, or it leads the next one).
pub(super) const LOOK_AGAIN: u8 = 4;
/// Leads the next fsync, waiting for callers to join it.
const GATHERING: u8 = 5;

/// What a caller waits on, its thread woken by whoever changes `state`.
pub(super) struct Waiter {
    thread: Thread,
    state: AtomicU8,
    /// Where the transaction's records end, or why it failed; set before `state`.
    outcome: Mutex<Option<Result<SyncPoint, Failure>>>,
}

impl Waiter {
    pub(super) fn new() -> Self {
        Waiter {
            thread: thread::current(),
            state: AtomicU8::new(QUEUED),
            outcome: Mutex::new(None),
        }
    }

    /// Where the settled transaction's records end, or why it failed.
    pub(super) fn take_outcome(&self) -> Result<SyncPoint, Failure> {
        self.outcome
            .lock()
            .take()
            .expect("a settled request has an outcome")
    }

    /// Sets the state and wakes the caller (unless it is this thread, which looks itself).
    fn wake(&self, state: u8) {
        let thread = self.thread.clone();
        self.state.store(state, Ordering::Release);
        if thread.id() != thread::current().id() {
            thread.unpark();
        }
    }
}

/// A transaction's work, run on whichever thread holds the store's mutex.
type Work<'a> = dyn FnMut(&mut Txn<'_>) + Send + 'a;

/// A queued transaction: its work, borrowed from the frame of the caller that waits for it.
pub(super) struct Request {
    work: *mut Work<'static>,
    waiter: Arc<Waiter>,
}

// SAFETY: the work is `Send`, and its caller waits (it does not touch it) while another
// thread runs it.
unsafe impl Send for Request {}

impl Request {
    /// # Safety
    /// `work` must stay alive, and untouched by the caller, until `waiter` is settled
    /// (state SETTLED or LOOK_AGAIN): the caller waits for that in
    /// [`FileStore::await_request`].
    pub(super) unsafe fn new<'a>(work: &'a mut Work<'a>, waiter: Arc<Waiter>) -> Self {
        let work: *mut Work<'a> = work;
        Request {
            // SAFETY: only the lifetime bound changes; the caller keeps `work` alive as
            // the contract above says.
            work: unsafe { std::mem::transmute::<*mut Work<'a>, *mut Work<'static>>(work) },
            waiter,
        }
    }
}

/// A caller waiting for an fsync.
pub(super) struct Sleeper {
    waiter: Arc<Waiter>,
    point: SyncPoint,
}

impl SyncPoint {
    fn is_durable(&self, sync: &SyncState) -> bool {
        // A newer generation was fsynced whole by the compaction that made it.
        sync.generation != self.generation || sync.synced >= self.offset
    }
}

impl FileStore {
    /// Waits until this caller's queued request is settled, running queued requests
    /// (its own among them) when the store's mutex is free; SETTLED or LOOK_AGAIN.
    pub(super) fn await_request(&self, waiter: &Waiter) -> u8 {
        loop {
            match waiter.state.load(Ordering::Acquire) {
                QUEUED => {
                    if let Some(inner) = self.inner.try_lock() {
                        self.combine(inner);
                        continue;
                    }
                    // A combiner runs it, or wakes this caller when it is done; any other
                    // holder of the mutex (maintenance) does not look at the queue.
                    if !self.combining.load(Ordering::Acquire) {
                        self.combine(self.inner.lock());
                        continue;
                    }
                    thread::park();
                }
                TAKEN | ASLEEP => thread::park(),
                settled => return settled,
            }
        }
    }

    /// Runs the queued requests under `inner`: at most [`MAX_KEPT`] batches under one hold
    /// of the journal's lock. Each caller is left asleep until the fsync that covers its
    /// records, and one of them leads that fsync.
    fn combine(&self, inner: MutexGuard<'_, Inner>) {
        // Another combiner took the request this caller queued.
        if self.queue.lock().is_empty() {
            return;
        }
        // The journal's lock, when the last combiner left it held for this one: nothing
        // changed the journal since it read it (`lock_journal` takes that over).
        let kept = self.lock_kept.swap(0, Ordering::Relaxed);
        let (mut inner, lock) = match kept {
            0 => self.prepare(inner),
            _ => (inner, Ok(FileLock::kept(&self.journal_lock))),
        };
        let lock = lock.and_then(|lock| match self.refusal(&inner) {
            Some(failure) => Err(failure),
            None => Ok(lock),
        });
        let lock = match lock {
            Ok(lock) => lock,
            Err(failure) => {
                // What failed the batch's preparation fails each of its transactions.
                let batch = std::mem::take(&mut *self.queue.lock());
                drop(inner);
                for request in batch {
                    self.settle(&request.waiter, Err(failure.clone()));
                }
                self.ensure_leader();
                return;
            }
        };
        self.combining.store(true, Ordering::Release);
        let mut batch = Vec::new();
        // Bounded, so that this caller returns (the rest are woken to run themselves).
        for _ in 0..MAX_KEPT {
            {
                let mut queue = self.queue.lock();
                for request in queue.iter() {
                    request.waiter.state.store(TAKEN, Ordering::Relaxed);
                }
                batch.append(&mut queue);
            }
            if batch.is_empty() {
                break;
            }
            for request in batch.drain(..) {
                // SAFETY: the request is not settled yet, so its caller keeps `work` alive
                // and waits (`Request::new`); this is its only use.
                let result = self.run_one(&mut inner, unsafe { &mut *request.work });
                self.settle(&request.waiter, result);
            }
        }
        self.combining.store(false, Ordering::Release);
        if self.in_transaction.load(Ordering::Acquire) > 0 && kept < MAX_KEPT {
            // More transactions of this process come at once: the next combiner takes the
            // lock over, skipping two syscalls and a catch-up; other processes get their
            // turn after MAX_KEPT combiners in a row.
            self.lock_kept.store(kept + 1, Ordering::Relaxed);
            lock.keep();
        } else {
            drop(lock);
        }
        drop(inner);
        // Callers that queued after the last look saw a combiner and sleep: they take the
        // mutex themselves (the queue is looked at after `combining` is cleared).
        for request in self.queue.lock().iter() {
            request.waiter.thread.unpark();
        }
        self.ensure_leader();
    }

    /// After a transaction ran: its caller sleeps until an fsync covers its records, or
    /// is woken at once when they are durable already or the transaction failed.
    fn settle(&self, waiter: &Arc<Waiter>, result: Result<SyncPoint, Failure>) {
        let mut sync = self.sync.lock();
        let outcome = match result {
            Ok(point) => match &sync.failed {
                Some(failure) => Err(failure.clone()),
                None => Ok(point),
            },
            Err(failure) => Err(failure),
        };
        let asleep = matches!(outcome, Ok(point) if !point.is_durable(&sync));
        if let (true, Ok(point)) = (asleep, &outcome) {
            sync.sleepers.push(Sleeper {
                waiter: waiter.clone(),
                point: *point,
            });
        }
        *waiter.outcome.lock() = Some(outcome);
        if asleep {
            waiter.state.store(ASLEEP, Ordering::Release);
        }
        // Appended (or failed): a gathering leader waits for no more from this caller (the
        // combiner looks whether the gathering is complete once it is done).
        self.in_transaction.fetch_sub(1, Ordering::AcqRel);
        drop(sync);
        if !asleep {
            waiter.wake(SETTLED);
        }
    }

    /// After a combiner ran its batch: when the fsync a leader gathers for has everyone it
    /// waits for, this thread runs it at once (the leader, asleep, sleeps on until it is
    /// done); when callers sleep for an fsync that nobody runs, one of them (this thread
    /// when it is one) leads it.
    fn ensure_leader(&self) {
        let mut sync = self.sync.lock();
        if sync.gathering && self.all_joined(&sync) {
            self.steal_gather(&mut sync);
            // What the fsync covered is reported to each sleeper, this thread's own too.
            let _ = self.run_sync(sync, false);
            return;
        }
        if sync.syncing || sync.sleepers.is_empty() {
            return;
        }
        let me = thread::current().id();
        let at = sync
            .sleepers
            .iter()
            .position(|s| s.waiter.thread.id() == me)
            .unwrap_or(0);
        let leader = sync.sleepers.remove(at);
        drop(sync);
        leader.waiter.wake(LOOK_AGAIN);
    }

    /// Returns once everything up to `point` is durable, sharing fsyncs with other callers.
    ///
    /// Group commit: while one fsync is in flight the next records queue up. Before it
    /// starts its fsync, a leader waits (at most half of the last fsync's time, asleep) for
    /// the callers the previous fsync released to append their next records, and for
    /// callers in the middle of a transaction, so that one fsync covers them all; the
    /// caller that completes the gathering starts the fsync itself, without waking the
    /// leader. Alone, it waits for nobody.
    pub(super) fn wait_durable(
        &self,
        point: SyncPoint,
        waiter: &Arc<Waiter>,
    ) -> Result<(), Failure> {
        let mut sync = self.sync.lock();
        loop {
            if let Some(failure) = &sync.failed {
                return Err(failure.clone());
            }
            if point.is_durable(&sync) {
                return Ok(());
            }
            if sync.syncing {
                waiter.state.store(ASLEEP, Ordering::Release);
                sync.sleepers.push(Sleeper {
                    waiter: waiter.clone(),
                    point,
                });
                if sync.gathering && self.all_joined(&sync) {
                    self.steal_gather(&mut sync);
                    return self.run_sync(sync, false);
                }
                drop(sync);
                if self.sleep(waiter) == SETTLED {
                    return Ok(());
                }
                sync = self.sync.lock();
                continue;
            }
            sync.syncing = true;
            sync.gathering = true;
            waiter.state.store(GATHERING, Ordering::Release);
            sync.gatherer = Some(Sleeper {
                waiter: waiter.clone(),
                point,
            });
            let deadline = Instant::now() + (sync.last_sync / 2).min(MAX_GATHER);
            // Asleep on its own thread: the caller that completes the gathering runs the
            // fsync and wakes this one with the rest.
            while waiter.state.load(Ordering::Acquire) == GATHERING && !self.all_joined(&sync) {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                MutexGuard::unlocked(&mut sync, || thread::park_timeout(left));
            }
            if waiter.state.load(Ordering::Acquire) != GATHERING {
                // Another caller completed the gathering and runs the fsync: this one is
                // among its sleepers.
                drop(sync);
                if self.sleep(waiter) == SETTLED {
                    return Ok(());
                }
                sync = self.sync.lock();
                continue;
            }
            sync.gathering = false;
            sync.gatherer = None;
            return self.run_sync(sync, true);
        }
    }

    /// Sleeps until woken out of ASLEEP: SETTLED or LOOK_AGAIN.
    fn sleep(&self, waiter: &Waiter) -> u8 {
        loop {
            match waiter.state.load(Ordering::Acquire) {
                ASLEEP => thread::park(),
                woken => return woken,
            }
        }
    }

    /// Takes over the fsync a leader gathers for; the leader sleeps until it is done.
    fn steal_gather(&self, sync: &mut SyncState) {
        sync.gathering = false;
        if let Some(gatherer) = sync.gatherer.take() {
            gatherer.waiter.state.store(ASLEEP, Ordering::Release);
            sync.sleepers.push(gatherer);
        }
    }

    /// Runs the fsync (`syncing` is set, the gathering over), then wakes the sleepers it
    /// covered and names the next leader; whether it succeeded. `leader_waits`: this
    /// thread waited for it without being among the sleepers.
    fn run_sync(
        &self,
        mut sync: MutexGuard<'_, SyncState>,
        leader_waits: bool,
    ) -> Result<(), Failure> {
        let (file, target, generation) = (sync.file.clone(), sync.written, sync.generation);
        let started = Instant::now();
        let covers = (sync.synced, target);
        let result = MutexGuard::unlocked(&mut sync, || self.sync_journal(&file, covers));
        sync.last_sync = started.elapsed();
        sync.syncing = false;
        match result {
            Ok(()) if sync.generation == generation => sync.synced = sync.synced.max(target),
            Ok(()) => {}
            Err(e) => {
                let failure: Failure = FileError::new("fsync", &self.journal_path, e).into();
                sync.failed = Some(failure.context(
                    "; the idempotency store refuses further work until the plugin is restarted",
                ));
            }
        }
        let woken = wake_sleepers(&mut sync, leader_waits);
        let result = sync.failed.clone().map_or(Ok(()), Err);
        // Woken outside the mutex: their next appends need it at once.
        drop(sync);
        for (waiter, state) in woken {
            waiter.wake(state);
        }
        result
    }

    /// The journal's `fdatasync`, covering the bytes from `covers.0` to `covers.1`
    /// (tests make a chosen one fail).
    fn sync_journal(&self, file: &std::fs::File, covers: (u64, u64)) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(e) = tests::injected_sync_failure(&self.journal_path, covers) {
            return Err(e);
        }
        let _ = covers;
        file.sync_data()
    }

    /// Whether every caller a leader expects has appended: those the last fsync released
    /// (most come back with their next record soon) and those mid-transaction.
    fn all_joined(&self, sync: &SyncState) -> bool {
        sync.sleepers.len() + 1 >= sync.released && self.in_transaction.load(Ordering::Acquire) == 0
    }
}

/// After an fsync: the sleepers it covered (SETTLED), and one it did not to lead the next
/// fsync (the others sleep on, covered by that one), after a failure all of them, to
/// report it (LOOK_AGAIN).
fn wake_sleepers(sync: &mut SyncState, leader_waits: bool) -> Vec<(Arc<Waiter>, u8)> {
    let sleepers = std::mem::take(&mut sync.sleepers);
    // Every caller that waited, the leader too: most come back soon with their next record.
    sync.released = sleepers.len() + leader_waits as usize;
    let mut leader_named = false;
    let mut woken = Vec::with_capacity(sleepers.len());
    for sleeper in sleepers {
        let state = if sync.failed.is_none() && sleeper.point.is_durable(sync) {
            SETTLED
        } else if sync.failed.is_some() || !leader_named {
            leader_named = true;
            LOOK_AGAIN
        } else {
            sync.sleepers.push(sleeper);
            continue;
        };
        woken.push((sleeper.waiter, state));
    }
    woken
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::FileStoreSettings;
    use super::*;
    use crate::error::ErrorCode;
    use crate::idempotency::{Claim, IdempotencyStore};
    use std::cell::Cell;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::mpsc;
    use std::time::Duration;

    /// An fsync of a journal to fail: after `successes` more, once; the bytes it covered.
    struct InjectedFailure {
        journal: PathBuf,
        successes: u32,
        failed: Option<(u64, u64)>,
    }

    static INJECTED: Mutex<Vec<InjectedFailure>> = Mutex::new(Vec::new());

    pub(in super::super) fn injected_sync_failure(
        journal: &Path,
        covers: (u64, u64),
    ) -> Option<std::io::Error> {
        let mut injected = INJECTED.lock();
        let failure = injected.iter_mut().find(|f| f.journal == journal)?;
        if failure.failed.is_some() {
            return None;
        }
        if failure.successes > 0 {
            failure.successes -= 1;
            return None;
        }
        failure.failed = Some(covers);
        Some(std::io::Error::from_raw_os_error(libc::EIO))
    }

    fn fail_sync_after(journal: &Path, successes: u32) {
        INJECTED.lock().push(InjectedFailure {
            journal: journal.to_path_buf(),
            successes,
            failed: None,
        });
    }

    /// The bytes the injected failure covered: from the end of what was durable before it
    /// to the end of what it was to make durable.
    fn injected_range(journal: &Path) -> Option<(u64, u64)> {
        INJECTED
            .lock()
            .iter()
            .find(|f| f.journal == journal)
            .and_then(|f| f.failed)
    }

    thread_local! {
        /// Where the last transaction of this thread ended in the journal, when it says.
        static LAST_END: Cell<Option<u64>> = const { Cell::new(None) };
    }

    pub(in super::super) fn note_outcome(outcome: &Result<SyncPoint, Failure>) {
        LAST_END.with(|end| end.set(outcome.as_ref().ok().map(|point| point.offset)));
    }

    /// Runs `scenario` on a thread of its own; fails the test if it has not returned
    /// within a minute (a caller left asleep for good).
    fn within_a_minute<T: Send + 'static>(scenario: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || done.send(scenario()));
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("callers still waiting after a minute")
    }

    fn settings() -> FileStoreSettings {
        FileStoreSettings {
            lease: Duration::from_secs(60),
            ttl: Duration::from_secs(3600),
            compaction_slack_bytes: 4096,
        }
    }

    fn run_key(store: &FileStore, key: &str) {
        let Ok(Claim::Acquired { token, .. }) = store.claim(key.as_bytes(), &[3; 32], 10) else {
            panic!("{key} not acquired");
        };
        store
            .complete(key.as_bytes(), token, &[3; 32], 0, 10)
            .unwrap();
    }

    /// Threads of one handle pass the journal's lock on to each other; another handle
    /// (as another process would) still gets its turn, compacts under them, and no
    /// record of either is lost.
    #[test]
    fn busy_threads_of_one_handle_neither_starve_another_nor_lose_records() {
        let dir = tempfile::tempdir().unwrap();
        let busy = FileStore::open(dir.path(), settings()).unwrap();
        let other = FileStore::open(dir.path(), settings()).unwrap();
        let done = AtomicBool::new(false);
        let written: Vec<u32> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..6)
                .map(|t| {
                    let (busy, done) = (&busy, &done);
                    scope.spawn(move || {
                        let mut n = 0;
                        while !done.load(Ordering::Relaxed) {
                            run_key(busy, &format!("busy-{t}-{n}"));
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            for i in 0..60 {
                run_key(&other, &format!("other-{i}"));
                if i % 20 == 19 {
                    other.compact_now(10).unwrap();
                }
            }
            done.store(true, Ordering::Relaxed);
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(other.compactions() >= 3);
        drop((busy, other));
        let reopened = FileStore::open(dir.path(), settings()).unwrap();
        let keys = (0..60).map(|i| format!("other-{i}")).chain(
            written
                .iter()
                .enumerate()
                .flat_map(|(t, n)| (0..*n).map(move |n| format!("busy-{t}-{n}"))),
        );
        for key in keys {
            assert_eq!(
                reopened.claim(key.as_bytes(), &[3; 32], 11).unwrap(),
                Claim::Replay { result: 0 },
                "{key}"
            );
        }
    }

    /// One fsync fails: every caller whose records it was to make durable gets its
    /// error, and no caller ever returned success for a record that was not durable; a
    /// restart then replays every completion that was acknowledged.
    #[test]
    fn a_failed_fsync_fails_every_caller_it_covered_and_none_released_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path(), settings()).unwrap());
        let journal = store.journal_path().to_path_buf();
        fail_sync_after(&journal, 40);
        let calls = {
            let store = store.clone();
            within_a_minute(move || {
                std::thread::scope(|scope| {
                    let threads: Vec<_> = (0..8)
                        .map(|t| {
                            let store = &store;
                            scope.spawn(move || {
                                // (key, whether it was the completion, succeeded, end)
                                let mut calls = Vec::new();
                                let mut note = |key: &str, completion, ok| {
                                    calls.push((key.to_string(), completion, ok, LAST_END.get()));
                                    ok
                                };
                                for i in 0.. {
                                    let key = format!("k-{t}-{i}");
                                    let claim = store.claim(key.as_bytes(), &[3; 32], 10);
                                    let token = match claim {
                                        Ok(Claim::Acquired { token, .. }) => token,
                                        Ok(other) => panic!("{key}: {other:?}"),
                                        Err(failure) => {
                                            note(&key, false, false);
                                            return (calls, failure);
                                        }
                                    };
                                    note(&key, false, true);
                                    let done =
                                        store.complete(key.as_bytes(), token, &[3; 32], 0, 10);
                                    if let Err(failure) = done {
                                        note(&key, true, false);
                                        return (calls, failure);
                                    }
                                    note(&key, true, true);
                                }
                                unreachable!()
                            })
                        })
                        .collect();
                    threads
                        .into_iter()
                        .map(|t| t.join().unwrap())
                        .collect::<Vec<_>>()
                })
            })
        };
        let (durable, target) = injected_range(&journal).expect("the fsync failed");
        let mut covered = 0;
        for (calls, failure) in &calls {
            assert_eq!(
                failure.code(),
                ErrorCode::FileIo.raw(),
                "{}",
                failure.detail()
            );
            assert!(failure.detail().contains("fsync"), "{}", failure.detail());
            for (key, _, ok, end) in calls {
                if *ok {
                    let end = end.expect("a success has its end");
                    assert!(
                        end <= durable,
                        "{key} acknowledged at {end}, durable {durable}"
                    );
                } else if let Some(end) = end.filter(|end| *end > durable && *end <= target) {
                    covered += 1;
                    assert!(end > durable);
                }
            }
            // Every later call is refused, with the same reason.
            let refused = store.claim(b"later", &[3; 32], 10).unwrap_err();
            assert_eq!(refused.detail(), failure.detail());
        }
        assert!(
            covered >= 1,
            "the failed fsync covered no caller ({durable}..{target})"
        );
        let failed: usize = calls
            .iter()
            .map(|(calls, _)| calls.iter().filter(|c| !c.2).count())
            .sum();
        assert_eq!(failed, 8, "each thread stops at its first failure");
        drop(store);
        let reopened = FileStore::open(dir.path(), settings()).unwrap();
        for (calls, _) in &calls {
            for (key, completion, ok, _) in calls {
                if *completion && *ok {
                    assert_eq!(
                        reopened.claim(key.as_bytes(), &[3; 32], 11).unwrap(),
                        Claim::Replay { result: 0 },
                        "{key}"
                    );
                }
            }
        }
    }

    /// A transaction that panics while another caller runs it fails alone: its caller
    /// gets the panic as an error, the other transactions of the batch go on.
    #[test]
    fn a_transaction_that_panics_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path(), settings()).unwrap());
        let store2 = store.clone();
        let panicked = within_a_minute(move || {
            let store = store2;
            std::thread::scope(|scope| {
                for t in 0..7 {
                    let store = &store;
                    scope.spawn(move || {
                        for i in 0..40 {
                            run_key(store, &format!("k-{t}-{i}"));
                        }
                    });
                }
                let store = &store;
                scope
                    .spawn(move || {
                        (0..40)
                            .filter(|i| {
                                let result = store.transact(|txn| {
                                    if i % 4 == 0 {
                                        panic!("boom {i}");
                                    }
                                    txn.put(format!("p-{i}").as_bytes(), None);
                                });
                                match result {
                                    Ok(()) => false,
                                    Err(failure) => {
                                        assert!(
                                            failure.detail().contains(&format!("boom {i}")),
                                            "{}",
                                            failure.detail()
                                        );
                                        true
                                    }
                                }
                            })
                            .count()
                    })
                    .join()
                    .unwrap()
            })
        });
        assert_eq!(panicked, 10);
        for t in 0..7 {
            for i in 0..40 {
                let key = format!("k-{t}-{i}");
                assert_eq!(
                    store.claim(key.as_bytes(), &[3; 32], 11).unwrap(),
                    Claim::Replay { result: 0 },
                    "{key}"
                );
            }
        }
    }

    /// Callers that queue while the mutex is held by something that runs no queued
    /// transaction (maintenance) take it themselves once it is free, instead of
    /// sleeping for a combiner that never comes.
    #[test]
    fn callers_queued_behind_maintenance_run_once_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path(), settings()).unwrap());
        let done = Arc::new(AtomicUsize::new(0));
        let held = store.inner.lock();
        let callers: Vec<_> = (0..8)
            .map(|t| {
                let (store, done) = (store.clone(), done.clone());
                std::thread::spawn(move || {
                    for i in 0..20 {
                        run_key(&store, &format!("k-{t}-{i}"));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            done.load(Ordering::Relaxed),
            0,
            "nothing runs under maintenance"
        );
        drop(held);
        within_a_minute(move || {
            for caller in callers {
                caller.join().unwrap();
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), 8);
    }
}
