//! `backup_log_run_command` in plain Rust: query the task's state, decide, skip or run, and
//! on failure retry with the log-backup policy, persisting the retry records before each
//! wait so that a restarted process continues the same sequence (same count, same budget,
//! only the remainder of a wait already begun).

pub use super::metrics::LogMetrics;
use super::records::{truncate_reason, LogRecordStore, RetryRecord, RunClaim, Sequence};
use super::{decide, KernelState, SubCommand};
use crate::clock::Clock;
use crate::error::{is_retryable, Error, Result};
use crate::idempotency::ClaimId;
use crate::metrics::store_failed;
use crate::retry::{retry_store_access, Execution, RetryPolicy, Sleeper};
use std::time::Duration;

/// The log-backup retry policy; a zero field takes its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRetryPolicy {
    pub max_retry: u32,
    pub min_wait: Duration,
    pub max_wait: Duration,
    pub timeout: Duration,
}

impl Default for LogRetryPolicy {
    fn default() -> Self {
        LogRetryPolicy {
            max_retry: 5,
            min_wait: Duration::from_secs(30),
            max_wait: Duration::from_secs(480),
            timeout: Duration::from_secs(1800),
        }
    }
}

impl LogRetryPolicy {
    /// Raw fields as C passes them (milliseconds); zero means the default.
    pub fn from_raw(max_retry: u32, min_ms: u64, max_ms: u64, timeout_ms: u64) -> Self {
        let d = LogRetryPolicy::default();
        let or = |ms: u64, default: Duration| {
            if ms == 0 {
                default
            } else {
                Duration::from_millis(ms)
            }
        };
        LogRetryPolicy {
            max_retry: if max_retry == 0 {
                d.max_retry
            } else {
                max_retry
            },
            min_wait: or(min_ms, d.min_wait),
            max_wait: or(max_ms, d.max_wait),
            timeout: or(timeout_ms, d.timeout),
        }
    }

    /// The same schedule as a policy of the retry core: waits doubling from `min_wait`,
    /// capped at `max_wait`, within `timeout` of the first failure.
    pub fn as_retry_policy(&self) -> RetryPolicy {
        RetryPolicy::fixed(self.max_retry, self.min_wait)
            .with_multiplier(2.0)
            .with_max_interval(Some(self.max_wait))
            .with_timeout(Some(self.timeout))
    }

    /// The wait before retry `n` (1-based): `min << (n-1)`, capped; computed by the retry
    /// core's backoff, so both loops wait by one rule.
    pub fn wait(&self, n: u32) -> Duration {
        self.as_retry_policy().nominal_wait(n)
    }
}

/// The task as the host drives it.
pub trait TaskDriver {
    /// The observed state, and whether the truncate target is reached; or an error code.
    fn query(&mut self) -> Result<(KernelState, bool)>;
    fn execute(&mut self, command: SubCommand) -> i32;
}

/// What one call did, for the plugin's books.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub result: Result<()>,
    /// Retries this call made (attempts after a wait it finished), not those it scheduled.
    pub retries: u32,
    pub skipped: bool,
}

enum Attempt {
    /// `recovered`: execute reported a failure but the effect is there.
    Done {
        skipped: bool,
        recovered: bool,
    },
    Retryable(Error),
    Permanent(Error),
}

enum Step {
    Attempt,
    /// Wait for the last record's expected time, then attempt.
    Wait,
    /// A previous process died during an attempt: look at the state first.
    AfterInterruptedAttempt,
}

/// Where a call starts: an unfinished sequence of an earlier call is resumed (after its
/// wait, or by looking at the state when its attempt was interrupted); a finished one is
/// removed (it stays readable only until the next sequence starts) and a new one begins.
fn resume_or_start(
    run: &dyn RunClaim,
    task: &str,
    command: SubCommand,
    loaded: Option<Sequence>,
) -> Result<(Sequence, Step)> {
    match loaded {
        Some(seq) if seq.outcome.is_none() && !seq.records.is_empty() => {
            let interrupted = seq.records.last().is_some_and(|r| r.real_retry_at_ms != 0);
            tracing::info!(
                task,
                command = command.name(),
                retries = seq.records.len(),
                "resuming an unfinished retry sequence"
            );
            let step = if interrupted {
                Step::AfterInterruptedAttempt
            } else {
                Step::Wait
            };
            Ok((seq, step))
        }
        existing => {
            if existing.is_some() {
                run.remove().map_err(store_failed)?;
            }
            Ok((Sequence::default(), Step::Attempt))
        }
    }
}

pub struct Runner<'a> {
    pub store: &'a dyn LogRecordStore,
    pub clock: &'a dyn Clock,
    pub sleeper: &'a mut dyn Sleeper,
    pub metrics: &'a LogMetrics,
}

impl Runner<'_> {
    /// Runs `command` on `task`; the record store is tried once.
    pub fn run(
        &mut self,
        task: &str,
        command: SubCommand,
        policy: &LogRetryPolicy,
        driver: &mut dyn TaskDriver,
    ) -> RunOutcome {
        self.run_retrying_store(task, command, policy, driver, |start| {
            Execution::once(start(0))
        })
    }

    /// [`Self::run`], the start of the call (taking the run's claim and loading its
    /// records) made through `retry_store` (the plugin's policy): a store that does not
    /// answer (an etcd cluster unreachable, an I/O error) is retried, and the store's own
    /// failure is what the call gives up with. Nothing is queried or executed before the
    /// store has answered.
    pub fn run_retrying_store(
        &mut self,
        task: &str,
        command: SubCommand,
        policy: &LogRetryPolicy,
        driver: &mut dyn TaskDriver,
        retry_store: impl FnOnce(&mut dyn FnMut(u32) -> Result<()>) -> Execution,
    ) -> RunOutcome {
        let mut outcome = RunOutcome {
            result: Ok(()),
            retries: 0,
            skipped: false,
        };
        let store = self.store;
        // One identity for every attempt of this call: a run claim whose answer was lost
        // is found again as this call's own.
        let run_id = ClaimId::new();
        let (started, retries) = retry_store_access(retry_store, "nothing was run", || {
            // One runner per (task, command), across threads, processes and hosts.
            let run = store.begin_run_as(task, command, run_id)?;
            let loaded = store.load(task, command).map_err(store_failed)?;
            Ok((run, loaded))
        });
        outcome.retries = retries;
        let (run, loaded) = match started {
            Ok(started) => started,
            Err(failure) => {
                outcome.result = Err(failure);
                return outcome;
            }
        };
        let run = run.as_ref();
        let (mut sequence, mut step) = match resume_or_start(run, task, command, loaded) {
            Ok(start) => start,
            Err(failure) => {
                outcome.result = Err(failure);
                return outcome;
            }
        };
        loop {
            let attempt = match step {
                Step::Wait => {
                    match self.wait_then_attempt(run, task, command, driver, &mut sequence) {
                        Ok(attempt) => {
                            // Counted when made, by the process making it: a wait cancelled by
                            // cleanup made no retry, and the process that resumes it makes it.
                            outcome.retries += 1;
                            attempt
                        }
                        Err(failure) => {
                            outcome.result = Err(failure);
                            return outcome;
                        }
                    }
                }
                Step::Attempt => self.attempt(command, driver),
                // The interrupted attempt counts as made: look at the state as any attempt
                // does; where it would run the command again, wait for the next retry.
                Step::AfterInterruptedAttempt => match self.observe(command, driver) {
                    Err(Attempt::Done { .. }) => Attempt::Done {
                        skipped: false,
                        recovered: true,
                    },
                    Err(other) => other,
                    Ok(_) => Attempt::Retryable(Error::Indeterminate(
                        "the previous attempt was interrupted (the process died)".to_string(),
                    )),
                },
            };
            match attempt {
                Attempt::Done { skipped, recovered } => {
                    outcome.skipped = skipped;
                    outcome.result = self.done(run, task, command, &sequence, skipped, recovered);
                    return outcome;
                }
                Attempt::Permanent(failure) => {
                    outcome.result = Err(self.finish(run, task, command, &mut sequence, failure));
                    return outcome;
                }
                Attempt::Retryable(failure) => {
                    match self.schedule_retry(run, task, command, policy, &mut sequence, failure) {
                        Ok(()) => step = Step::Wait,
                        Err(failure) => {
                            outcome.result = Err(failure);
                            return outcome;
                        }
                    }
                }
            }
        }
    }

    /// [`Step::Wait`]: waits for the last record's retry time, notes when the retry was
    /// made (persisted before the attempt), counts it in the metrics and makes it. Fails
    /// with CANCELLED when cleanup cuts the wait short (the sequence stays unfinished: a
    /// later call resumes it), or with the store's failure.
    fn wait_then_attempt(
        &mut self,
        run: &dyn RunClaim,
        task: &str,
        command: SubCommand,
        driver: &mut dyn TaskDriver,
        sequence: &mut Sequence,
    ) -> Result<Attempt> {
        let last = sequence.records.last().expect("a wait follows a record");
        // Never longer than the wait as scheduled, even if the wall clock
        // stepped back since (a resumed wait only waits its remainder).
        let nominal = last
            .expected_retry_at_ms
            .saturating_sub(last.detect_failed_at_ms);
        let remaining = last
            .expected_retry_at_ms
            .saturating_sub(self.clock.unix_ms())
            .min(nominal);
        if self
            .sleeper
            .sleep(Duration::from_millis(remaining))
            .is_err()
        {
            tracing::warn!(
                task,
                command = command.name(),
                "log-backup retry wait cancelled"
            );
            return Err(Error::Cancelled(format!(
                "plugin cleanup during the retry wait of {} on task {task:?}",
                command.name()
            )));
        }
        let now = self.clock.unix_ms();
        sequence
            .records
            .last_mut()
            .expect("checked above")
            .real_retry_at_ms = now.max(1);
        // Persisted before the attempt: an attempt cut short by death counts as made.
        run.save(sequence).map_err(store_failed)?;
        let reason = sequence.records.last().map_or(0, |r| r.reason_code);
        self.metrics.retries[command as usize].inc(reason);
        Ok(self.attempt(command, driver))
    }

    /// The command is done (or was already): the recovery and the skip counted and logged,
    /// the sequence's duration observed, its records removed.
    fn done(
        &self,
        run: &dyn RunClaim,
        task: &str,
        command: SubCommand,
        sequence: &Sequence,
        skipped: bool,
        recovered: bool,
    ) -> Result<()> {
        if recovered || !sequence.records.is_empty() {
            LogMetrics::bump(&self.metrics.recoveries, command);
            tracing::info!(
                task,
                command = command.name(),
                retries = sequence.records.len(),
                "log-backup command recovered"
            );
        }
        if skipped {
            LogMetrics::bump(&self.metrics.skips, command);
            tracing::debug!(
                task,
                command = command.name(),
                "log-backup command skipped: already done"
            );
        }
        self.metrics
            .finished(command, sequence, self.clock.unix_ms());
        // Records exist on disk only once a retry was scheduled.
        if sequence.records.is_empty() {
            Ok(())
        } else {
            run.remove().map_err(store_failed)
        }
    }

    /// Queries the task and decides: `Ok(command to run)`, or how the attempt ends
    /// without running anything (skipped, a state to retry, a permanent error).
    fn observe(
        &self,
        command: SubCommand,
        driver: &mut dyn TaskDriver,
    ) -> Result<SubCommand, Attempt> {
        let (state, truncated) = match driver.query() {
            Ok(observed) => observed,
            Err(failure) if is_retryable(failure.code()) => {
                return Err(Attempt::Retryable(failure))
            }
            Err(failure) => return Err(Attempt::Permanent(failure)),
        };
        let decision = decide(command, state, truncated);
        if decision.need_sync {
            self.metrics.syncs[command as usize][state as usize].inc();
        }
        if state == KernelState::Unknown {
            return Err(Attempt::Retryable(Error::Indeterminate(
                "the task's state is UNKNOWN".to_string(),
            )));
        }
        if decision.should_skip {
            return Err(Attempt::Done {
                skipped: true,
                recovered: false,
            });
        }
        decision.actual.ok_or_else(|| {
            Attempt::Permanent(Error::InvalidState(format!(
                "cannot {} a task in state {state:?}",
                command.name()
            )))
        })
    }

    fn attempt(&self, command: SubCommand, driver: &mut dyn TaskDriver) -> Attempt {
        let actual = match self.observe(command, driver) {
            Ok(actual) => actual,
            Err(ended) => return ended,
        };
        let code = driver.execute(actual);
        if code == 0 {
            return Attempt::Done {
                skipped: false,
                recovered: false,
            };
        }
        // The failure may have been only in reporting it: is the effect there now?
        if let Ok((state, truncated)) = driver.query() {
            if decide(command, state, truncated).should_skip {
                tracing::info!(
                    command = command.name(),
                    code,
                    "execute failed but the effect is there: success"
                );
                return Attempt::Done {
                    skipped: false,
                    recovered: true,
                };
            }
        }
        // The host's own code is kept as it is, even outside the table.
        let failure = Error::HostCall {
            what: actual.name().to_string(),
            code,
        };
        if is_retryable(code) {
            Attempt::Retryable(failure)
        } else {
            Attempt::Permanent(failure)
        }
    }

    /// Records a retry and persists it before the wait, or ends the sequence when the
    /// retries or the budget are spent.
    fn schedule_retry(
        &self,
        run: &dyn RunClaim,
        task: &str,
        command: SubCommand,
        policy: &LogRetryPolicy,
        sequence: &mut Sequence,
        failure: Error,
    ) -> Result<()> {
        let now = self.clock.unix_ms();
        let first_failure = *sequence.first_failure_ms.get_or_insert(now);
        let retry_num = sequence.records.len() as u32 + 1;
        if retry_num > policy.max_retry {
            let reason = Error::RetryExhausted {
                context: format!(
                    "{} of task {task:?} failed after {} retries",
                    command.name(),
                    policy.max_retry
                ),
                last: Box::new(failure),
            };
            return Err(self.finish(run, task, command, sequence, reason));
        }
        let wait_ms = policy.wait(retry_num).as_millis() as u64;
        let expected = now.saturating_add(wait_ms);
        let budget_end = first_failure.saturating_add(policy.timeout.as_millis() as u64);
        if expected > budget_end {
            let reason = Error::Timeout {
                context: format!(
                    "{} of task {task:?}: the next wait of {wait_ms} ms would end past the {} ms budget",
                    command.name(),
                    policy.timeout.as_millis()
                ),
                last: Box::new(failure),
            };
            return Err(self.finish(run, task, command, sequence, reason));
        }
        sequence.records.push(RetryRecord {
            retry_num,
            detect_failed_at_ms: now,
            expected_retry_at_ms: expected,
            real_retry_at_ms: 0,
            reason_code: failure.code(),
            original_reason: truncate_reason(&failure.detail()),
        });
        tracing::info!(
            task,
            command = command.name(),
            retry = retry_num,
            code = failure.code(),
            wait_ms,
            "log-backup command failed, retrying"
        );
        run.save(sequence).map_err(store_failed)
    }

    /// Ends the sequence with `failure` (persisted when there are records to keep).
    fn finish(
        &self,
        run: &dyn RunClaim,
        task: &str,
        command: SubCommand,
        sequence: &mut Sequence,
        failure: Error,
    ) -> Error {
        tracing::warn!(task, command = command.name(), code = failure.code(), reason = %failure.detail(), "log-backup command gave up");
        sequence.outcome = Some(failure.code());
        self.metrics
            .finished(command, sequence, self.clock.unix_ms());
        if !sequence.records.is_empty() {
            if let Err(save_failure) = run.save(sequence).map_err(store_failed) {
                tracing::warn!(error = %save_failure, "could not persist the end of a retry sequence");
            }
        }
        failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::error::ErrorCode;
    use crate::log_backup::records::FileLogRecords;
    use crate::retry::FakeSleeper;
    use KernelState::*;

    /// A task whose answers the test scripts; `state` changes when a command succeeds.
    struct FakeTask {
        state: KernelState,
        truncated: bool,
        execute_results: Vec<i32>,
        executed: Vec<SubCommand>,
        /// Apply the command's effect even when reporting a failure.
        effect_despite_failure: bool,
        query_error: Option<i32>,
    }

    impl FakeTask {
        fn new(state: KernelState) -> Self {
            FakeTask {
                state,
                truncated: false,
                execute_results: vec![],
                executed: vec![],
                effect_despite_failure: false,
                query_error: None,
            }
        }
    }

    impl TaskDriver for FakeTask {
        fn query(&mut self) -> Result<(KernelState, bool)> {
            match self.query_error {
                Some(code) => Err(Error::Host(code)),
                None => Ok((self.state, self.truncated)),
            }
        }
        fn execute(&mut self, command: SubCommand) -> i32 {
            self.executed.push(command);
            let code = if self.execute_results.is_empty() {
                0
            } else {
                self.execute_results.remove(0)
            };
            if code == 0 || self.effect_despite_failure {
                match command {
                    SubCommand::Start | SubCommand::Resume => self.state = Running,
                    SubCommand::Stop => self.state = NotExist,
                    SubCommand::Pause => self.state = Paused,
                    SubCommand::Truncate => self.truncated = true,
                }
            }
            code
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: FileLogRecords,
        clock: ManualClock,
        metrics: LogMetrics,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            Fixture {
                store: FileLogRecords::new(dir.path()),
                _dir: dir,
                clock: ManualClock::new(1_000_000),
                metrics: LogMetrics::default(),
            }
        }

        fn run(
            &self,
            command: SubCommand,
            policy: LogRetryPolicy,
            task: &mut FakeTask,
            cancel_on_wait: Option<usize>,
        ) -> (RunOutcome, Vec<u64>) {
            let mut sleeper = FakeSleeper {
                clock: self.clock.clone(),
                waits: vec![],
                cancel_on_wait,
            };
            let mut runner = Runner {
                store: &self.store,
                clock: &self.clock,
                sleeper: &mut sleeper,
                metrics: &self.metrics,
            };
            let outcome = runner.run("task-1", command, &policy, task);
            (
                outcome,
                sleeper.waits.iter().map(|w| w.as_millis() as u64).collect(),
            )
        }

        fn records(&self, command: SubCommand) -> Option<Sequence> {
            self.store.load("task-1", command).unwrap()
        }
    }

    fn code(outcome: &RunOutcome) -> i32 {
        outcome.result.as_ref().err().map_or(0, |f| f.code())
    }

    /// The record store of `Fixture`, refusing the next `failures` starts with `code`.
    struct Unanswering<'a> {
        store: &'a FileLogRecords,
        failures: std::sync::atomic::AtomicU32,
        code: ErrorCode,
        /// The identity of each start attempt.
        runs: parking_lot::Mutex<Vec<ClaimId>>,
    }

    impl LogRecordStore for Unanswering<'_> {
        fn begin_run_as(
            &self,
            task: &str,
            command: SubCommand,
            run: ClaimId,
        ) -> Result<Box<dyn crate::log_backup::records::RunClaim + '_>> {
            self.runs.lock().push(run);
            self.begin_run(task, command)
        }
        fn begin_run(
            &self,
            task: &str,
            command: SubCommand,
        ) -> Result<Box<dyn crate::log_backup::records::RunClaim + '_>> {
            use std::sync::atomic::Ordering::Relaxed;
            if self.failures.load(Relaxed) > 0 {
                self.failures.fetch_sub(1, Relaxed);
                return Err(Error::etcd(self.code, "no member answered"));
            }
            self.store.begin_run(task, command)
        }
        fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>> {
            self.store.load(task, command)
        }
        fn reset(&self, task: &str, command: SubCommand) -> Result<()> {
            self.store.reset(task, command)
        }
    }

    #[test]
    fn a_store_that_does_not_answer_is_retried_through_the_policy_before_anything_runs() {
        let f = Fixture::new();
        let run = |failures: u32, code: ErrorCode, task: &mut FakeTask| {
            let store = Unanswering {
                store: &f.store,
                failures: failures.into(),
                code,
                runs: Default::default(),
            };
            let mut sleeper = FakeSleeper {
                clock: f.clock.clone(),
                waits: vec![],
                cancel_on_wait: None,
            };
            let mut runner = Runner {
                store: &store,
                clock: &f.clock,
                sleeper: &mut sleeper,
                metrics: &f.metrics,
            };
            let outcome = runner.run_retrying_store(
                "task-1",
                SubCommand::Start,
                &LogRetryPolicy::default(),
                task,
                crate::retry::retrying_on(&f.clock, 3),
            );
            // Every attempt of the call claims the run as one identity.
            let runs = store.runs.lock();
            assert_eq!(runs.len() as u32, outcome.retries + 1);
            assert!(runs.windows(2).all(|w| w[0] == w[1]), "{runs:?}");
            outcome
        };

        // Two starts unanswered, then the store answers: the command runs once.
        let mut task = FakeTask::new(NotExist);
        let outcome = run(2, ErrorCode::Network, &mut task);
        assert_eq!((code(&outcome), outcome.retries), (0, 2));
        assert_eq!(task.executed, vec![SubCommand::Start]);

        // Unanswered past the policy: the store's own code, its retries counted and
        // said, and the task neither queried nor executed.
        let mut task = FakeTask::new(NotExist);
        task.query_error = Some(ErrorCode::InvalidParam.raw());
        let outcome = run(10, ErrorCode::ConnectionLost, &mut task);
        let failure = outcome.result.clone().unwrap_err();
        assert_eq!(failure.code(), ErrorCode::ConnectionLost.raw());
        assert!(
            failure
                .detail()
                .contains("nothing was run: 3 retries failed"),
            "{}",
            failure.detail()
        );
        assert_eq!(outcome.retries, 3);
        assert!(task.executed.is_empty());

        // A store failure that is not retryable ends the call at once.
        let mut task = FakeTask::new(NotExist);
        let outcome = run(1, ErrorCode::DiskFull, &mut task);
        assert_eq!(
            (code(&outcome), outcome.retries),
            (ErrorCode::DiskFull.raw(), 0)
        );
        assert!(task.executed.is_empty());
    }

    #[test]
    fn skips_translates_and_runs() {
        let f = Fixture::new();
        let mut running = FakeTask::new(Running);
        let (outcome, _) = f.run(
            SubCommand::Start,
            LogRetryPolicy::default(),
            &mut running,
            None,
        );
        assert_eq!(code(&outcome), 0);
        assert!(outcome.skipped);
        assert!(
            running.executed.is_empty(),
            "a skipped command does not execute"
        );

        let mut paused = FakeTask::new(Paused);
        f.run(
            SubCommand::Start,
            LogRetryPolicy::default(),
            &mut paused,
            None,
        );
        assert_eq!(paused.executed, vec![SubCommand::Resume]);

        let mut absent = FakeTask::new(NotExist);
        f.run(
            SubCommand::Resume,
            LogRetryPolicy::default(),
            &mut absent,
            None,
        );
        assert_eq!(absent.executed, vec![SubCommand::Start]);

        let (outcome, _) = f.run(
            SubCommand::Pause,
            LogRetryPolicy::default(),
            &mut FakeTask::new(NotExist),
            None,
        );
        assert_eq!(code(&outcome), ErrorCode::InvalidState.raw());
        assert_eq!(f.metrics.of(SubCommand::Start)[2], 1, "one skip of start");
        assert_eq!(
            f.metrics.of(SubCommand::Start)[3],
            1,
            "one state sync of start"
        );
    }

    #[test]
    fn a_failure_whose_effect_is_there_is_a_success() {
        let f = Fixture::new();
        let mut task = FakeTask::new(NotExist);
        task.execute_results = vec![ErrorCode::Network.raw()];
        task.effect_despite_failure = true;
        let (outcome, waits) = f.run(
            SubCommand::Start,
            LogRetryPolicy::default(),
            &mut task,
            None,
        );
        assert_eq!(code(&outcome), 0);
        assert!(waits.is_empty());
        assert_eq!(task.executed.len(), 1);
    }

    #[test]
    fn retries_with_doubling_waits_and_recovers() {
        let f = Fixture::new();
        let mut task = FakeTask::new(Running);
        task.execute_results = vec![-6, -11, 0];
        let (outcome, waits) = f.run(SubCommand::Stop, LogRetryPolicy::default(), &mut task, None);
        assert_eq!(code(&outcome), 0);
        assert_eq!(outcome.retries, 2);
        assert_eq!(waits, vec![30_000, 60_000]);
        assert_eq!(
            f.records(SubCommand::Stop),
            None,
            "success clears the records"
        );
        assert_eq!(f.metrics.of(SubCommand::Stop)[..2], [2, 1]);
    }

    #[test]
    fn exhaustion_after_five_retries_keeps_the_records() {
        let f = Fixture::new();
        let mut task = FakeTask::new(NotExist);
        task.execute_results = vec![-6; 100];
        let policy = LogRetryPolicy::from_raw(5, 10, 1_000, 3_600_000);
        let (outcome, waits) = f.run(SubCommand::Start, policy, &mut task, None);
        assert_eq!(code(&outcome), ErrorCode::RetryExhausted.raw());
        assert_eq!(task.executed.len(), 6);
        assert_eq!(waits, vec![10, 20, 40, 80, 160]);
        let seq = f.records(SubCommand::Start).unwrap();
        assert_eq!(seq.outcome, Some(ErrorCode::RetryExhausted.raw()));
        assert_eq!(seq.records.len(), 5);
        assert!(seq
            .records
            .iter()
            .all(|r| r.real_retry_at_ms >= r.expected_retry_at_ms && r.reason_code == -6));
        // The next call starts a new sequence.
        task.execute_results = vec![];
        assert_eq!(
            code(&f.run(SubCommand::Start, policy, &mut task, None).0),
            0
        );
        assert_eq!(f.records(SubCommand::Start), None);
    }

    #[test]
    fn no_wait_ends_past_the_budget() {
        let f = Fixture::new();
        let mut task = FakeTask::new(Running);
        task.query_error = Some(ErrorCode::ConnectionLost.raw());
        // Waits 100, 200, 400: a 500 ms budget allows 100 + 200 and refuses the third.
        let policy = LogRetryPolicy::from_raw(10, 100, 10_000, 500);
        let (outcome, waits) = f.run(SubCommand::Pause, policy, &mut task, None);
        assert_eq!(code(&outcome), ErrorCode::Timeout.raw());
        assert_eq!(waits, vec![100, 200]);
        assert_eq!(
            f.records(SubCommand::Pause).unwrap().outcome,
            Some(ErrorCode::Timeout.raw())
        );
    }

    #[test]
    fn unknown_state_is_retried_and_a_permanent_query_error_ends_the_call() {
        let f = Fixture::new();
        let mut task = FakeTask::new(Unknown);
        let policy = LogRetryPolicy::from_raw(2, 1, 1, 1_000_000);
        let (outcome, _) = f.run(SubCommand::Resume, policy, &mut task, None);
        assert_eq!(code(&outcome), ErrorCode::RetryExhausted.raw());
        let seq = f.records(SubCommand::Resume).unwrap();
        assert!(seq
            .records
            .iter()
            .all(|r| r.reason_code == ErrorCode::Unknown.raw()));

        let mut broken = FakeTask::new(Running);
        broken.query_error = Some(ErrorCode::PermissionDenied.raw());
        let (outcome, _) = f.run(SubCommand::Stop, policy, &mut broken, None);
        assert_eq!(code(&outcome), ErrorCode::PermissionDenied.raw());
    }

    #[test]
    fn a_cancelled_sequence_resumes_with_the_same_count_and_budget() {
        let f = Fixture::new();
        let mut task = FakeTask::new(NotExist);
        task.execute_results = vec![-6; 100];
        let policy = LogRetryPolicy::from_raw(5, 1_000, 100_000, 10_000_000);
        // Cancelled during the third wait: three attempts made, three records written.
        let (outcome, _) = f.run(SubCommand::Start, policy, &mut task, Some(3));
        assert_eq!(code(&outcome), ErrorCode::Cancelled.raw());
        assert_eq!(task.executed.len(), 3);
        let seq = f.records(SubCommand::Start).unwrap();
        assert_eq!((seq.outcome, seq.records.len()), (None, 3));
        // 1.5 s later a new process resumes: it waits only the remaining 2.5 s of the 4 s wait.
        f.clock.advance(Duration::from_millis(1_500));
        let (outcome, waits) = f.run(SubCommand::Start, policy, &mut task, None);
        assert_eq!(code(&outcome), ErrorCode::RetryExhausted.raw());
        assert_eq!(
            task.executed.len(),
            6,
            "5 retries across both lives, not 5 per life"
        );
        assert_eq!(waits, vec![2_500, 8_000, 16_000]);
    }

    #[test]
    fn an_attempt_cut_short_by_death_counts_as_made() {
        let f = Fixture::new();
        let seq = Sequence {
            records: vec![RetryRecord {
                retry_num: 1,
                detect_failed_at_ms: 1,
                expected_retry_at_ms: 2,
                real_retry_at_ms: 3,
                reason_code: -6,
                original_reason: "x".into(),
            }],
            outcome: None,
            first_failure_ms: Some(f.clock.unix_ms()),
        };
        f.store
            .begin_run("task-1", SubCommand::Start)
            .unwrap()
            .save(&seq)
            .unwrap();
        let mut task = FakeTask::new(NotExist);
        task.execute_results = vec![-6; 100];
        let policy = LogRetryPolicy::from_raw(2, 1, 1, 1_000_000);
        let (outcome, _) = f.run(SubCommand::Start, policy, &mut task, None);
        assert_eq!(code(&outcome), ErrorCode::RetryExhausted.raw());
        // Retry 1 was the interrupted attempt; only retry 2 runs now.
        assert_eq!(task.executed.len(), 1);
    }

    /// An unfinished sequence whose last attempt was interrupted by the process's death.
    fn interrupted(f: &Fixture, command: SubCommand) {
        let now = f.clock.unix_ms();
        let seq = Sequence {
            records: vec![RetryRecord {
                retry_num: 1,
                detect_failed_at_ms: now - 10,
                expected_retry_at_ms: now - 5,
                real_retry_at_ms: now - 5,
                reason_code: -6,
                original_reason: "x".into(),
            }],
            outcome: None,
            first_failure_ms: Some(now - 10),
        };
        f.store
            .begin_run("task-1", command)
            .unwrap()
            .save(&seq)
            .unwrap();
    }

    #[test]
    fn after_an_interrupted_attempt_permanent_answers_end_the_call() {
        let policy = LogRetryPolicy::from_raw(5, 1, 1, 1_000_000);
        // A state the command cannot act on: INVALID_STATE, not a retry as UNKNOWN.
        let f = Fixture::new();
        interrupted(&f, SubCommand::Pause);
        let mut task = FakeTask::new(NotExist);
        let (outcome, waits) = f.run(SubCommand::Pause, policy, &mut task, None);
        assert_eq!(code(&outcome), ErrorCode::InvalidState.raw());
        assert!(waits.is_empty() && task.executed.is_empty());
        let seq = f.records(SubCommand::Pause).unwrap();
        assert_eq!(seq.outcome, Some(ErrorCode::InvalidState.raw()), "finished");
        // A query failing with a permanent code: that code.
        let f = Fixture::new();
        interrupted(&f, SubCommand::Start);
        let mut task = FakeTask::new(NotExist);
        task.query_error = Some(ErrorCode::PermissionDenied.raw());
        let (outcome, waits) = f.run(SubCommand::Start, policy, &mut task, None);
        assert_eq!(code(&outcome), ErrorCode::PermissionDenied.raw());
        assert!(waits.is_empty() && task.executed.is_empty());
    }

    #[test]
    fn a_resumed_wait_never_outgrows_its_length_when_the_clock_steps_back() {
        let f = Fixture::new();
        let mut task = FakeTask::new(NotExist);
        task.execute_results = vec![-6; 100];
        let policy = LogRetryPolicy::from_raw(1, 4_000, 100_000, 10_000_000);
        let (outcome, _) = f.run(SubCommand::Start, policy, &mut task, Some(1));
        assert_eq!(code(&outcome), ErrorCode::Cancelled.raw());
        // The wall clock steps far back before the next process resumes.
        f.clock.set_unix_ms(f.clock.unix_ms() / 2);
        let (_, waits) = f.run(SubCommand::Start, policy, &mut task, None);
        assert_eq!(waits, vec![4_000], "at most the 4 s wait as scheduled");
    }

    #[test]
    fn a_second_runner_of_the_same_command_is_refused_at_once() {
        let f = Fixture::new();
        let held = f.store.begin_run("task-1", SubCommand::Start).unwrap();
        let mut task = FakeTask::new(NotExist);
        let (outcome, waits) = f.run(
            SubCommand::Start,
            LogRetryPolicy::default(),
            &mut task,
            None,
        );
        assert_eq!(code(&outcome), ErrorCode::InProgress.raw());
        assert!(waits.is_empty() && task.executed.is_empty());
        drop(held);
        let (outcome, _) = f.run(
            SubCommand::Start,
            LogRetryPolicy::default(),
            &mut task,
            None,
        );
        assert_eq!(code(&outcome), 0);
    }

    #[test]
    fn a_retry_is_counted_by_the_run_that_makes_it_not_the_one_that_schedules_it() {
        let f = Fixture::new();
        let mut task = FakeTask::new(NotExist);
        task.execute_results = vec![ErrorCode::Network.raw()];
        let policy = LogRetryPolicy::from_raw(5, 1_000, 100_000, 10_000_000);
        // The first run fails, schedules retry 1, and is cancelled during its wait.
        let (outcome, _) = f.run(SubCommand::Start, policy, &mut task, Some(1));
        assert_eq!(code(&outcome), ErrorCode::Cancelled.raw());
        assert_eq!(outcome.retries, 0, "a cancelled wait made no retry");
        assert_eq!(f.metrics.of(SubCommand::Start)[0], 0);
        // The run that resumes it makes the retry, which succeeds: counted there.
        f.clock.advance(Duration::from_millis(400));
        let (outcome, waits) = f.run(SubCommand::Start, policy, &mut task, None);
        assert_eq!((code(&outcome), outcome.retries), (0, 1));
        assert_eq!(waits, vec![600]);
        let m = &f.metrics;
        assert_eq!(m.retries[SubCommand::Start as usize].get(-6), 1);
        assert_eq!(
            m.of(SubCommand::Start)[..2],
            [1, 1],
            "one retry, one recovery"
        );
        // 1 s from the first failure to the success: the first bucket (le=1).
        let h = m.retry_duration[SubCommand::Start as usize].snapshot();
        assert_eq!((h.count(), h.sum_ms, h.cumulative[0]), (1, 1_000, 1));
    }

    #[test]
    fn metrics_name_the_reason_the_observed_state_and_every_terminal_outcome() {
        let f = Fixture::new();
        // START on a paused task: a state sync observed in state PAUSED.
        f.run(
            SubCommand::Start,
            LogRetryPolicy::default(),
            &mut FakeTask::new(Paused),
            None,
        );
        assert_eq!(
            f.metrics.syncs[SubCommand::Start as usize][Paused as usize].get(),
            1
        );
        // Two retries after an UNKNOWN state, then exhaustion after 3 s.
        let policy = LogRetryPolicy::from_raw(2, 1_000, 2_000, 1_000_000);
        f.run(
            SubCommand::Resume,
            policy,
            &mut FakeTask::new(Unknown),
            None,
        );
        let resume = SubCommand::Resume as usize;
        assert_eq!(f.metrics.retries[resume].get(ErrorCode::Unknown.raw()), 2);
        assert_eq!(f.metrics.syncs[resume][Unknown as usize].get(), 3);
        let h = f.metrics.retry_duration[resume].snapshot();
        assert_eq!((h.count(), h.sum_ms), (1, 3_000));
        assert_eq!(h.cumulative[..3], [0, 0, 1], "3 s lies in le=4");
        // A host code outside the table is permanent: no retry, no duration observed.
        let mut odd = FakeTask::new(Running);
        odd.execute_results = vec![-1234];
        f.run(SubCommand::Stop, policy, &mut odd, None);
        assert_eq!(f.metrics.of(SubCommand::Stop)[0], 0);
        assert_eq!(
            f.metrics.retry_duration[SubCommand::Stop as usize]
                .snapshot()
                .count(),
            0
        );
    }

    #[test]
    fn the_retry_cores_backoff_gives_the_doubling_schedule_exactly() {
        for (min, max) in [
            (1, u64::MAX),
            (30_000, 480_000),
            (7, 1 << 40),
            (1_000, 1_000),
        ] {
            let policy = LogRetryPolicy::from_raw(100, min, max, 0);
            for n in 1..80u32 {
                let shifted = min
                    .checked_shl(n - 1)
                    .filter(|v| v >> (n - 1) == min)
                    .unwrap_or(u64::MAX)
                    .min(max);
                assert_eq!(
                    policy.wait(n),
                    Duration::from_millis(shifted),
                    "{min} {max} {n}"
                );
            }
        }
    }

    #[test]
    fn waits_saturate() {
        let policy = LogRetryPolicy::from_raw(100, 30_000, u64::MAX, 0);
        assert_eq!(policy.wait(1), Duration::from_millis(30_000));
        assert_eq!(policy.wait(64), Duration::from_millis(u64::MAX));
        assert_eq!(LogRetryPolicy::default().wait(10), Duration::from_secs(480));
    }
}
