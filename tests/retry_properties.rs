//! Properties of the retry core for arbitrary policies and operations (proptest): no wait
//! above the cap, no wait ending past the budget, jitter within [0, wait], and
//! attempts = 1 + retries, whatever the outcome. The loop runs on a clock of the test's
//! own and a sleeper that records each wait and moves that clock, so no real time passes.

use backup_coordinator::cancel::Cancelled;
use backup_coordinator::clock::Clock;
use backup_coordinator::error::{Error, ErrorCode};
use backup_coordinator::retry::{self, RetryEnv, RetryPolicy, RetryProgress, Sleeper};
use proptest::prelude::*;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const START_MS: u64 = 1_000_000;

/// Moves only when the sleeper sleeps; saturates instead of wrapping on absurd waits.
#[derive(Clone)]
struct TestClock(Arc<AtomicU64>);

impl Clock for TestClock {
    fn unix_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    fn monotonic_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// One wait: after which attempt it came, how long, and the clock when it began.
#[derive(Debug, Clone, Copy)]
struct Wait {
    after_attempt: u32,
    duration: Duration,
    began_ms: u64,
}

struct RecordingSleeper {
    clock: TestClock,
    attempts: Rc<Cell<u32>>,
    waits: Vec<Wait>,
}

impl Sleeper for RecordingSleeper {
    fn sleep(&mut self, duration: Duration) -> Result<(), Cancelled> {
        let began_ms = self.clock.monotonic_ms();
        self.waits.push(Wait {
            after_attempt: self.attempts.get(),
            duration,
            began_ms,
        });
        let ms = duration.as_millis().min(u64::MAX as u128) as u64;
        self.clock
            .0
            .store(began_ms.saturating_add(ms), Ordering::SeqCst);
        Ok(())
    }
}

fn multiplier() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => 1.0f64..8.0,
        1 => 0.0f64..1.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(-2.0),
        1 => 1.0f64..1e6,
    ]
}

fn millis(max: u64) -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        (1..=max).prop_map(Duration::from_millis),
        Just(Duration::from_millis(u64::MAX)),
    ]
}

prop_compose! {
    fn policy()(
        max_retry in prop_oneof![0u32..12, Just(40u32)],
        initial in millis(100_000),
        cap in proptest::option::of(millis(1_000_000)),
        multiplier in multiplier(),
        jitter in any::<bool>(),
        timeout in proptest::option::of(millis(10_000_000)),
    ) -> RetryPolicy {
        RetryPolicy::fixed(max_retry, initial)
            .with_max_interval(cap)
            .with_multiplier(multiplier)
            .with_jitter(jitter)
            .with_timeout(timeout)
    }
}

/// What attempt n (0-based) returns: a retryable failure, a permanent one, or success.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Retryable,
    Permanent,
    Success,
}

fn script() -> impl Strategy<Value = Vec<Outcome>> {
    proptest::collection::vec(
        prop_oneof![
            6 => Just(Outcome::Retryable),
            1 => Just(Outcome::Permanent),
            1 => Just(Outcome::Success),
        ],
        0..50,
    )
}

struct Run {
    attempts: u32,
    waits: Vec<Wait>,
    execution: retry::Execution,
    progress: RetryProgress,
}

fn run(policy: &RetryPolicy, script: &[Outcome], seed: u64) -> Run {
    let clock = TestClock(Arc::new(AtomicU64::new(START_MS)));
    let attempts = Rc::new(Cell::new(0u32));
    let mut sleeper = RecordingSleeper {
        clock: clock.clone(),
        attempts: attempts.clone(),
        waits: Vec::new(),
    };
    let mut env = RetryEnv {
        clock: &clock,
        sleeper: &mut sleeper,
        jitter_seed: Some(seed),
        on_progress: retry::no_progress,
    };
    let mut progress = RetryProgress::default();
    let counter = attempts.clone();
    let execution = retry::run(policy, &mut env, &mut progress, |retry| {
        let n = counter.get();
        assert_eq!(retry, n, "the loop numbers attempts as they come");
        counter.set(n + 1);
        // Past the script's end the operation keeps failing with a retryable code.
        match script
            .get(n as usize)
            .copied()
            .unwrap_or(Outcome::Retryable)
        {
            Outcome::Retryable => Err(Error::Host(ErrorCode::FileIo.raw())),
            Outcome::Permanent => Err(Error::Host(ErrorCode::PermissionDenied.raw())),
            Outcome::Success => Ok(()),
        }
    });
    Run {
        attempts: attempts.get(),
        waits: sleeper.waits,
        execution,
        progress,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn no_wait_above_the_cap(policy in policy(), script in script(), seed in any::<u64>()) {
        let run = run(&policy, &script, seed);
        if let Some(cap) = policy.max_interval {
            for wait in &run.waits {
                prop_assert!(wait.duration <= cap, "wait {wait:?} above the cap {cap:?}");
            }
        }
    }

    #[test]
    fn no_wait_ends_past_the_budget(policy in policy(), script in script(), seed in any::<u64>()) {
        let run = run(&policy, &script, seed);
        // The budget counts from the first failure, which is at the start (no time passes
        // in an attempt here).
        if let Some(timeout) = policy.timeout {
            let end = START_MS.saturating_add(timeout.as_millis().min(u64::MAX as u128) as u64);
            for wait in &run.waits {
                let ms = wait.duration.as_millis().min(u64::MAX as u128) as u64;
                prop_assert!(
                    wait.began_ms.saturating_add(ms) <= end,
                    "wait {wait:?} ends past the budget's end at {end}"
                );
            }
        }
    }

    #[test]
    fn each_wait_is_the_nominal_one_or_a_jitter_within_it(
        policy in policy(), script in script(), seed in any::<u64>()
    ) {
        let run = run(&policy, &script, seed);
        for wait in &run.waits {
            // The wait after attempt k comes before retry number k.
            let nominal = policy.nominal_wait(wait.after_attempt);
            if policy.jitter {
                prop_assert!(wait.duration <= nominal, "jittered {wait:?} above {nominal:?}");
            } else {
                prop_assert_eq!(wait.duration, nominal);
            }
        }
    }

    #[test]
    fn the_backoff_jitters_within_zero_and_the_nominal_wait(
        policy in policy(), seed in any::<u64>()
    ) {
        let jittered = policy.with_jitter(true).backoff(fastrand::Rng::with_seed(seed));
        let mut given = 0u32;
        for (i, wait) in jittered.enumerate() {
            let nominal = policy.nominal_wait(i as u32 + 1);
            prop_assert!(wait <= nominal, "retry {}: {wait:?} above {nominal:?}", i + 1);
            given += 1;
        }
        prop_assert_eq!(given, policy.max_retry, "one wait per retry allowed");
    }

    #[test]
    fn attempts_are_one_plus_retries(policy in policy(), script in script(), seed in any::<u64>()) {
        let run = run(&policy, &script, seed);
        prop_assert_eq!(run.attempts, 1 + run.execution.retries);
        prop_assert_eq!(run.progress.current_retry, run.execution.retries);
        prop_assert!(run.execution.retries <= policy.max_retry);
        // Every wait lies between two attempts.
        prop_assert!(run.waits.len() as u32 <= run.execution.retries);
        let last = script.get(run.attempts as usize - 1).copied().unwrap_or(Outcome::Retryable);
        match (&run.execution.result, last) {
            (Ok(()), Outcome::Success) => {}
            (Err(f), Outcome::Permanent) => {
                prop_assert_eq!(f.code(), ErrorCode::PermissionDenied.raw());
            }
            (Err(f), Outcome::Retryable) => {
                // Given up for lack of retries or of budget, never with retries and budget left.
                if f.code() == ErrorCode::RetryExhausted.raw() {
                    prop_assert_eq!(run.execution.retries, policy.max_retry);
                } else {
                    prop_assert_eq!(f.code(), ErrorCode::Timeout.raw());
                    prop_assert!(policy.timeout.is_some());
                }
            }
            (result, last) => prop_assert!(false, "{result:?} after an attempt that gave {last:?}"),
        }
    }

    #[test]
    fn without_a_budget_a_failing_operation_gets_every_retry(
        policy in policy(), seed in any::<u64>()
    ) {
        let policy = policy.with_timeout(None);
        let run = run(&policy, &[], seed);
        prop_assert_eq!(run.execution.retries, policy.max_retry);
        prop_assert_eq!(run.attempts, 1 + policy.max_retry);
        prop_assert_eq!(run.execution.code(), ErrorCode::RetryExhausted.raw());
    }
}
