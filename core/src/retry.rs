//! The retry core: a backoff policy, and the loop that runs an operation through it.
//!
//! Modelled on backon: a [`Backoff`] is an iterator of waits, and [`run`] is one small
//! loop (call, return on success, return on a permanent error, ask for the next wait,
//! check the budget, sleep). The sleeper and the clock are injected, so tests do not wait.

use crate::cancel::{CancelToken, Cancelled};
use crate::clock::Clock;
use crate::error::{is_retryable, message_of, Error, ErrorCode, Result};
use std::time::Duration;

/// How an operation is retried. `Copy`, with saturating arithmetic throughout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries allowed after the first attempt.
    pub max_retry: u32,
    /// The first wait.
    pub initial_interval: Duration,
    /// Cap of one wait; `None` means no cap.
    pub max_interval: Option<Duration>,
    /// Growth of each wait over the previous one; 1.0 is a fixed interval.
    pub multiplier: f64,
    /// Full jitter: each wait is uniform in `[0, computed wait]`.
    pub jitter: bool,
    /// Budget counted from the first failure; no wait may end past it. `None`: no budget.
    pub timeout: Option<Duration>,
}

impl RetryPolicy {
    /// The taosX policy: `max_retry` retries, a fixed interval between them.
    pub fn fixed(max_retry: u32, interval: Duration) -> Self {
        RetryPolicy {
            max_retry,
            initial_interval: interval,
            max_interval: None,
            multiplier: 1.0,
            jitter: false,
            timeout: None,
        }
    }

    pub fn with_max_interval(mut self, cap: Option<Duration>) -> Self {
        self.max_interval = cap;
        self
    }

    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The wait before retry number `retry` (1-based), before jitter.
    pub fn nominal_wait(&self, retry: u32) -> Duration {
        let initial_ms = self.initial_interval.as_millis() as f64;
        let factor = if self.multiplier.is_finite() && self.multiplier > 0.0 {
            self.multiplier
        } else {
            1.0
        };
        let exponent = retry.saturating_sub(1).min(i32::MAX as u32) as i32;
        let wait_ms = initial_ms * factor.powi(exponent);
        let mut wait = if wait_ms.is_finite() && wait_ms < u64::MAX as f64 {
            Duration::from_millis(wait_ms as u64)
        } else {
            Duration::from_millis(u64::MAX)
        };
        if let Some(cap) = self.max_interval {
            wait = wait.min(cap);
        }
        wait
    }

    pub fn backoff(&self, rng: fastrand::Rng) -> Backoff {
        Backoff {
            policy: *self,
            retries_given: 0,
            rng,
        }
    }
}

/// The waits between attempts; `None` once the retries are spent.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    retries_given: u32,
    rng: fastrand::Rng,
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.retries_given >= self.policy.max_retry {
            return None;
        }
        self.retries_given += 1;
        let wait = self.policy.nominal_wait(self.retries_given);
        if self.policy.jitter && !wait.is_zero() {
            let ms = wait.as_millis().min(u64::MAX as u128) as u64;
            return Some(Duration::from_millis(self.rng.u64(0..=ms)));
        }
        Some(wait)
    }
}

/// Where one execution stands; what `SRetryContext` mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryState {
    #[default]
    Idle = 0,
    Retrying = 1,
    Success = 2,
    Failed = 3,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryProgress {
    /// Retries started so far in this execution.
    pub current_retry: u32,
    pub state: RetryState,
    /// The code the last failed attempt returned (0 when none has failed).
    pub last_error: i32,
    /// Unix ms when the last retry started (0: none yet).
    pub last_retry_time_ms: u64,
}

/// Sleeps between attempts; cancellable.
pub trait Sleeper {
    fn sleep(&mut self, duration: Duration) -> Result<(), Cancelled>;
}

/// A sleeper that takes its cancel token at its first wait (a call that never waits never
/// reads the epoch); every wait of the call is cancelled by a cleanup since that first one.
pub struct LazyCancellableSleeper(pub Option<CancelToken>);

impl Sleeper for LazyCancellableSleeper {
    fn sleep(&mut self, duration: Duration) -> Result<(), Cancelled> {
        self.0
            .get_or_insert_with(crate::cancel::token)
            .sleep(duration)
    }
}

/// The real sleeper: a condition-variable wait that `cancel_all` interrupts.
pub struct CancellableSleeper(pub CancelToken);

impl Sleeper for CancellableSleeper {
    fn sleep(&mut self, duration: Duration) -> Result<(), Cancelled> {
        self.0.sleep(duration)
    }
}

/// Whatever one execution needs from outside: time, sleeping, randomness, and a way to
/// show its progress as it goes (the FFI mirrors it into the caller's `SRetryContext`).
/// Generic over the progress callback so that the success path inlines it.
pub struct RetryEnv<'a, P: FnMut(&RetryProgress)> {
    pub clock: &'a dyn Clock,
    pub sleeper: &'a mut dyn Sleeper,
    /// Seed of the jitter; `None`: a random seed, drawn only once a wait is needed (the
    /// success path stays free of it).
    pub jitter_seed: Option<u64>,
    pub on_progress: P,
}

/// The progress callback of a caller that does not watch.
pub fn no_progress(_: &RetryProgress) {}

/// The result of one execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// `Ok` when an attempt succeeded; otherwise the code and reason the call gives up with.
    pub result: Result<()>,
    /// Retries performed (attempts after the first).
    pub retries: u32,
    /// The last attempt's own failure, when there was one.
    pub last_failure: Option<Error>,
}

impl Execution {
    /// The first attempt succeeded.
    #[inline]
    fn at_once() -> Self {
        Execution {
            result: Ok(()),
            retries: 0,
            last_failure: None,
        }
    }

    /// One attempt and no retry, whatever it returned.
    pub fn once(result: Result<()>) -> Self {
        Execution {
            last_failure: result.as_ref().err().cloned(),
            result,
            retries: 0,
        }
    }

    pub fn code(&self) -> i32 {
        match &self.result {
            Ok(()) => ErrorCode::Success.raw(),
            Err(failure) => failure.code(),
        }
    }
}

/// Runs `op` under `policy`, updating `progress` as the state machine of C_API §2 says.
///
/// The first attempt is inlined into the caller and its success costs a few stores: the
/// progress shown twice (RETRYING, then SUCCESS), nothing else. Backoff, budget, clock and
/// sleeper are touched only after a failure, in [`run_after_failure`], kept out of line.
#[inline]
pub fn run<F, P>(
    policy: &RetryPolicy,
    env: &mut RetryEnv<'_, P>,
    progress: &mut RetryProgress,
    mut op: F,
) -> Execution
where
    F: FnMut(u32) -> Result<()>,
    P: FnMut(&RetryProgress),
{
    match first_attempt(progress, &mut env.on_progress, || op(0)) {
        Ok(()) => Execution::at_once(),
        Err(failure) => run_after_failure(policy, env, progress, &mut op, failure),
    }
}

/// The first attempt of an execution (C_API §2: RETRYING shown, the operation called, SUCCESS
/// shown if it succeeded). Callers that keep the failure path out of line call this, then
/// [`run_now_after`] with its failure; the error type is theirs until then, so that the
/// success path builds no [`Error`].
#[inline(always)]
pub fn first_attempt<E, P>(
    progress: &mut RetryProgress,
    on_progress: &mut P,
    op: impl FnOnce() -> Result<(), E>,
) -> Result<(), E>
where
    P: FnMut(&RetryProgress),
{
    // Built in a local and stored after the call, so that the success path keeps it in
    // registers instead of writing the caller's memory before the operation runs.
    let shown = RetryProgress {
        current_retry: 0,
        state: RetryState::Retrying,
        last_error: ErrorCode::Success.raw(),
        last_retry_time_ms: progress.last_retry_time_ms,
    };
    on_progress(&shown);
    let result = op();
    *progress = shown;
    if result.is_ok() {
        progress.state = RetryState::Success;
        on_progress(progress);
    }
    result
}

/// The rest of [`run`] once an attempt has failed: decide, wait, try again.
#[cold]
fn run_after_failure<F, P>(
    policy: &RetryPolicy,
    env: &mut RetryEnv<'_, P>,
    progress: &mut RetryProgress,
    op: &mut F,
    first_failure: Error,
) -> Execution
where
    F: FnMut(u32) -> Result<()>,
    P: FnMut(&RetryProgress),
{
    let mut schedule = Schedule::default();
    let mut attempt = Err(first_failure);
    loop {
        let failure = match attempt {
            Ok(()) => {
                // last_error keeps the last failure's code (0 when none): it names the
                // last *error* an attempt returned, as in the original plugin.
                progress.state = RetryState::Success;
                (env.on_progress)(progress);
                return Execution {
                    result: Ok(()),
                    retries: progress.current_retry,
                    last_failure: None,
                };
            }
            Err(failure) => failure,
        };
        progress.last_error = failure.code();
        let retried = schedule
            .next_wait(policy, env, progress.current_retry, &failure)
            .and_then(|wait| wait_for_retry(policy, env, progress, &failure, wait));
        if let Err(reason) = retried {
            progress.state = RetryState::Failed;
            (env.on_progress)(progress);
            return Execution {
                result: Err(reason),
                retries: progress.current_retry,
                last_failure: Some(failure),
            };
        }
        progress.last_retry_time_ms = env.clock.unix_ms();
        (env.on_progress)(progress);
        attempt = op(progress.current_retry);
    }
}

/// The backoff and the budget of one execution, built at its first failure: an operation
/// that succeeds at once pays for none of it.
#[derive(Default)]
struct Schedule {
    backoff: Option<Backoff>,
    budget_end_ms: Option<u64>,
}

impl Schedule {
    /// The wait before retrying `failure` after `retries` retries, or why there is none (the
    /// reason the execution gives up with): a permanent error, the attempts exhausted
    /// (RETRY_EXHAUSTED), or a wait that would end past the budget (TIMEOUT).
    fn next_wait<P: FnMut(&RetryProgress)>(
        &mut self,
        policy: &RetryPolicy,
        env: &RetryEnv<'_, P>,
        retries: u32,
        failure: &Error,
    ) -> Result<Duration> {
        if !is_retryable(failure.code()) {
            tracing::debug!(code = failure.code(), detail = %failure, "permanent error, not retried");
            return Err(failure.clone());
        }
        let now = env.clock.monotonic_ms();
        let budget_end = *self
            .budget_end_ms
            .get_or_insert_with(|| match policy.timeout {
                Some(timeout) => now.saturating_add(timeout.as_millis() as u64),
                None => u64::MAX,
            });
        let backoff = self.backoff.get_or_insert_with(|| {
            let rng = match env.jitter_seed {
                Some(seed) => fastrand::Rng::with_seed(seed),
                None => fastrand::Rng::new(),
            };
            policy.backoff(rng)
        });
        let Some(wait) = backoff.next() else {
            tracing::warn!(
                retries,
                last_error = failure.code(),
                "retry attempts exhausted, giving up"
            );
            return Err(Error::RetryExhausted {
                context: format!("{retries} retries failed"),
                last: Box::new(failure.clone()),
            });
        };
        let wait_ms = wait.as_millis().min(u64::MAX as u128) as u64;
        if now.saturating_add(wait_ms) > budget_end {
            tracing::warn!(
                retries,
                last_error = failure.code(),
                wait_ms,
                "retry budget exhausted, giving up"
            );
            return Err(Error::Timeout {
                context: format!(
                    "the next wait of {wait_ms} ms would end past the retry budget of {} ms from the first failure",
                    policy.timeout.map_or(0, |t| t.as_millis()),
                ),
                last: Box::new(failure.clone()),
            });
        }
        Ok(wait)
    }
}

/// Counts the retry of `failure` and waits `wait` before it; a wait cancelled by plugin
/// cleanup takes the count back and is the reason the execution gives up (CANCELLED).
fn wait_for_retry<P: FnMut(&RetryProgress)>(
    policy: &RetryPolicy,
    env: &mut RetryEnv<'_, P>,
    progress: &mut RetryProgress,
    failure: &Error,
    wait: Duration,
) -> Result<()> {
    progress.current_retry += 1;
    tracing::info!(
        retry = progress.current_retry,
        max_retry = policy.max_retry,
        code = failure.code(),
        error = message_of(failure.code()),
        wait_ms = wait.as_millis().min(u64::MAX as u128) as u64,
        "operation failed, retrying"
    );
    if !wait.is_zero() && env.sleeper.sleep(wait).is_err() {
        progress.current_retry -= 1;
        tracing::warn!(
            retries = progress.current_retry,
            last_error = failure.code(),
            "retry wait cancelled"
        );
        return Err(Error::Cancelled(format!(
            "plugin cleanup during a retry wait; last error {}: {failure}",
            failure.code()
        )));
    }
    Ok(())
}

/// Runs `op` with real time: the system clock, and waits that `cancel_all` interrupts.
/// The cancel token is taken at the first wait, so that a call that succeeds at once never
/// reads it; a cleanup during that wait or any later one cancels the call. (C_API §4's rule
/// for calls that started before a cleanup concerns plugin-level calls, which hold the
/// instance's token: see [`run_until_cancelled`].)
#[inline]
pub fn run_now<F, P>(
    policy: &RetryPolicy,
    progress: &mut RetryProgress,
    on_progress: P,
    op: F,
) -> Execution
where
    F: FnMut(u32) -> Result<()>,
    P: FnMut(&RetryProgress),
{
    let mut on_progress = on_progress;
    let mut op = op;
    match first_attempt(progress, &mut on_progress, || op(0)) {
        Ok(()) => Execution::at_once(),
        Err(failure) => run_now_after(policy, progress, on_progress, op, failure),
    }
}

/// [`run_now`] from the failure of its [`first_attempt`] on: `progress` is as that left it,
/// and `op` makes the retries (numbered from 1).
#[cold]
#[inline(never)]
pub fn run_now_after<F, P>(
    policy: &RetryPolicy,
    progress: &mut RetryProgress,
    on_progress: P,
    mut op: F,
    failure: Error,
) -> Execution
where
    F: FnMut(u32) -> Result<()>,
    P: FnMut(&RetryProgress),
{
    let mut sleeper = LazyCancellableSleeper(None);
    let mut env = RetryEnv {
        clock: &crate::clock::SystemClock,
        sleeper: &mut sleeper,
        jitter_seed: None,
        on_progress,
    };
    run_after_failure(policy, &mut env, progress, &mut op, failure)
}

/// [`run_now`] with waits cancelled through `token`: a caller that took its token earlier
/// (the plugin instance, at init) is cancelled by any cleanup since.
#[inline]
pub fn run_until_cancelled<F, P>(
    policy: &RetryPolicy,
    progress: &mut RetryProgress,
    on_progress: P,
    token: CancelToken,
    op: F,
) -> Execution
where
    F: FnMut(u32) -> Result<()>,
    P: FnMut(&RetryProgress),
{
    let mut sleeper = CancellableSleeper(token);
    let mut env = RetryEnv {
        clock: &crate::clock::SystemClock,
        sleeper: &mut sleeper,
        jitter_seed: None,
        on_progress,
    };
    run(policy, &mut env, progress, op)
}

/// Runs a state-store `access` through `retry` (a policy given as a closure) and keeps
/// what the attempt that succeeded returned; and the retries made either way. When the
/// policy gives up, the store's own failure, saying `nothing_done` (see
/// [`Error::store_gave_up`]).
pub fn retry_store_access<T>(
    retry: impl FnOnce(&mut dyn FnMut(u32) -> Result<()>) -> Execution,
    nothing_done: &str,
    mut access: impl FnMut() -> Result<T>,
) -> (Result<T>, u32) {
    let mut value = None;
    let execution = retry(&mut |_| {
        value = Some(access()?);
        Ok(())
    });
    let result = match (value, execution.result) {
        (Some(value), Ok(())) => Ok(value),
        (_, Err(failure)) => Err(failure.store_gave_up(nothing_done)),
        (None, Ok(())) => unreachable!("the attempt that succeeded left its value"),
    };
    (result, execution.retries)
}

/// A sleeper for tests: advances a manual clock instead of sleeping, notes each wait, and
/// reports cancellation at the wait it is told to.
#[cfg(test)]
pub(crate) struct FakeSleeper {
    pub clock: crate::clock::ManualClock,
    pub waits: Vec<Duration>,
    /// 1-based number of the wait that is cancelled.
    pub cancel_on_wait: Option<usize>,
}

#[cfg(test)]
impl Sleeper for FakeSleeper {
    fn sleep(&mut self, duration: Duration) -> Result<(), Cancelled> {
        if self.cancel_on_wait == Some(self.waits.len() + 1) {
            return Err(Cancelled);
        }
        self.waits.push(duration);
        self.clock.advance(duration);
        Ok(())
    }
}

/// For tests of callers that take a policy as a closure: runs `op` under a fixed policy of
/// `max_retry` retries 1 s apart, waiting on `clock` with a [`FakeSleeper`].
#[cfg(test)]
pub(crate) fn retrying_on(
    clock: &crate::clock::ManualClock,
    max_retry: u32,
) -> impl FnOnce(&mut dyn FnMut(u32) -> Result<()>) -> Execution + '_ {
    move |op| {
        let mut sleeper = FakeSleeper {
            clock: clock.clone(),
            waits: Vec::new(),
            cancel_on_wait: None,
        };
        let policy = RetryPolicy::fixed(max_retry, Duration::from_secs(1));
        let mut env = RetryEnv {
            clock,
            sleeper: &mut sleeper,
            jitter_seed: Some(1),
            on_progress: no_progress,
        };
        run(&policy, &mut env, &mut Default::default(), op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn harness(clock: &ManualClock) -> FakeSleeper {
        FakeSleeper {
            clock: clock.clone(),
            waits: Vec::new(),
            cancel_on_wait: None,
        }
    }

    fn execute(
        policy: RetryPolicy,
        sleeper: &mut FakeSleeper,
        mut results: Vec<i32>,
    ) -> (Execution, RetryProgress, u32) {
        let clock = sleeper.clock.clone();
        let mut env = RetryEnv {
            clock: &clock,
            sleeper,
            jitter_seed: Some(7),
            on_progress: no_progress,
        };
        let mut progress = RetryProgress::default();
        let mut attempts = 0;
        results.reverse();
        let execution = run(&policy, &mut env, &mut progress, |_| {
            attempts += 1;
            match results.pop().unwrap_or(0) {
                0 => Ok(()),
                code => Err(Error::Host(code)),
            }
        });
        (execution, progress, attempts)
    }

    #[test]
    fn three_retryable_failures_then_success_make_four_attempts() {
        let clock = ManualClock::new(1_000);
        let mut sleeper = harness(&clock);
        let policy = RetryPolicy::fixed(5, Duration::from_secs(1));
        let (execution, progress, attempts) = execute(policy, &mut sleeper, vec![-6, -6, -6, 0]);
        assert_eq!(execution.result, Ok(()));
        assert_eq!(attempts, 4);
        assert_eq!(execution.retries, 3);
        assert_eq!(progress.state, RetryState::Success);
        assert_eq!(progress.current_retry, 3);
        assert_eq!(progress.last_error, -6);
        assert_eq!(sleeper.waits, vec![Duration::from_secs(1); 3]);
        assert_eq!(progress.last_retry_time_ms, 4_000);
    }

    #[test]
    fn a_permanent_error_ends_after_one_attempt() {
        let clock = ManualClock::new(0);
        let mut sleeper = harness(&clock);
        let (execution, progress, attempts) = execute(
            RetryPolicy::fixed(5, Duration::from_secs(1)),
            &mut sleeper,
            vec![-1],
        );
        assert_eq!(execution.code(), -1);
        assert_eq!(attempts, 1);
        assert_eq!(progress.state, RetryState::Failed);
        assert!(sleeper.waits.is_empty());
    }

    #[test]
    fn unknown_codes_are_permanent_and_returned_as_they_are() {
        let clock = ManualClock::new(0);
        let mut sleeper = harness(&clock);
        let (execution, _, attempts) = execute(
            RetryPolicy::fixed(5, Duration::ZERO),
            &mut sleeper,
            vec![42],
        );
        assert_eq!(execution.code(), 42);
        assert_eq!(attempts, 1);
    }

    #[test]
    fn exhaustion_keeps_the_last_error() {
        let clock = ManualClock::new(0);
        let mut sleeper = harness(&clock);
        let (execution, progress, attempts) = execute(
            RetryPolicy::fixed(3, Duration::ZERO),
            &mut sleeper,
            vec![-6, -11, -6, -5],
        );
        assert_eq!(execution.code(), ErrorCode::RetryExhausted.raw());
        assert_eq!(attempts, 4);
        assert_eq!(progress.current_retry, 3);
        assert_eq!(progress.last_error, -5);
        assert_eq!(execution.last_failure.unwrap().code(), -5);
        // An interval of zero means no wait at all.
        assert!(sleeper.waits.is_empty());
    }

    #[test]
    fn exponential_backoff_is_capped() {
        let policy = RetryPolicy::fixed(10, Duration::from_millis(100))
            .with_multiplier(2.0)
            .with_max_interval(Some(Duration::from_millis(1_000)));
        let waits: Vec<u128> = policy
            .backoff(fastrand::Rng::with_seed(1))
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(
            waits,
            vec![100, 200, 400, 800, 1000, 1000, 1000, 1000, 1000, 1000]
        );
    }

    #[test]
    fn huge_multipliers_saturate_instead_of_overflowing() {
        let policy = RetryPolicy::fixed(200, Duration::from_secs(5)).with_multiplier(1e6);
        let last = policy.backoff(fastrand::Rng::with_seed(1)).last().unwrap();
        assert_eq!(last, Duration::from_millis(u64::MAX));
    }

    #[test]
    fn full_jitter_stays_within_the_nominal_wait_and_varies() {
        let policy = RetryPolicy::fixed(50, Duration::from_millis(1_000)).with_jitter(true);
        let waits: Vec<Duration> = policy.backoff(fastrand::Rng::with_seed(3)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(1_000)));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 10, "jitter produced {distinct:?}");
    }

    #[test]
    fn no_wait_may_end_past_the_budget() {
        let clock = ManualClock::new(0);
        let mut sleeper = harness(&clock);
        // Waits of 100, 200, 400, 800 ms; a budget of 1000 ms allows 100+200+400 = 700.
        let policy = RetryPolicy::fixed(10, Duration::from_millis(100))
            .with_multiplier(2.0)
            .with_timeout(Some(Duration::from_millis(1_000)));
        let (execution, progress, attempts) = execute(policy, &mut sleeper, vec![-7; 20]);
        assert_eq!(execution.code(), ErrorCode::Timeout.raw());
        assert_eq!(progress.last_error, -7);
        assert_eq!(attempts, 4);
        assert_eq!(
            sleeper.waits.iter().sum::<Duration>(),
            Duration::from_millis(700)
        );
        assert_eq!(progress.state, RetryState::Failed);
        assert!(clock.monotonic_ms() <= 1_000);
    }

    #[test]
    fn a_cancelled_wait_ends_the_call() {
        let clock = ManualClock::new(0);
        let mut sleeper = harness(&clock);
        sleeper.cancel_on_wait = Some(2);
        let (execution, progress, attempts) = execute(
            RetryPolicy::fixed(10, Duration::from_secs(5)),
            &mut sleeper,
            vec![-6; 20],
        );
        assert_eq!(execution.code(), ErrorCode::Cancelled.raw());
        assert_eq!(attempts, 2);
        assert_eq!(progress.current_retry, 1);
        assert_eq!(progress.last_error, -6);
    }

    #[test]
    fn progress_is_reported_as_it_changes() {
        let clock = ManualClock::new(0);
        let mut sleeper = harness(&clock);
        let mut seen = Vec::new();
        let mut record = |p: &RetryProgress| seen.push((p.state, p.current_retry));
        let mut env = RetryEnv {
            clock: &clock,
            sleeper: &mut sleeper,
            jitter_seed: Some(1),
            on_progress: &mut record,
        };
        let mut progress = RetryProgress::default();
        let mut calls = 0;
        run(
            &RetryPolicy::fixed(3, Duration::ZERO),
            &mut env,
            &mut progress,
            |_| {
                calls += 1;
                if calls < 2 {
                    Err(Error::Host(-6))
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(
            seen,
            vec![
                (RetryState::Retrying, 0),
                (RetryState::Retrying, 1),
                (RetryState::Success, 1)
            ]
        );
    }
}
