//! Process-wide cancellation of waits.
//!
//! `backup_plugin_cleanup` must wake every wait in progress at once. A call takes a
//! [`CancelToken`] when it starts (one atomic load, so the success path stays cheap);
//! [`cancel_all`] moves the epoch on, and every wait whose token is older returns
//! [`Cancelled`] immediately, including waits the call only reaches later.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static EPOCH: AtomicU64 = AtomicU64::new(0);
// The epoch only moves while this lock is held, so a sleeper cannot miss the wake-up.
static WAKE_LOCK: Mutex<()> = Mutex::new(());
static WAKE: Condvar = Condvar::new();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

#[derive(Debug, Clone, Copy)]
pub struct CancelToken {
    epoch: u64,
}

/// A token for a call starting now.
pub fn token() -> CancelToken {
    CancelToken {
        epoch: EPOCH.load(Ordering::Acquire),
    }
}

/// Cancels every wait of every token taken before this call.
pub fn cancel_all() {
    let _guard = WAKE_LOCK.lock();
    EPOCH.fetch_add(1, Ordering::AcqRel);
    WAKE.notify_all();
}

impl CancelToken {
    pub fn is_cancelled(&self) -> bool {
        EPOCH.load(Ordering::Acquire) != self.epoch
    }

    /// Sleeps for `duration` unless cancelled first.
    pub fn sleep(&self, duration: Duration) -> Result<(), Cancelled> {
        let deadline = Instant::now().checked_add(duration);
        let mut guard = WAKE_LOCK.lock();
        loop {
            if self.is_cancelled() {
                return Err(Cancelled);
            }
            match deadline {
                Some(deadline) => {
                    if Instant::now() >= deadline {
                        return Ok(());
                    }
                    WAKE.wait_until(&mut guard, deadline);
                }
                // A wait too long to represent: only cancellation ends it.
                None => WAKE.wait(&mut guard),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_wakes_a_long_sleep_at_once() {
        let token = token();
        let started = Instant::now();
        let sleeper = std::thread::spawn(move || token.sleep(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(50));
        cancel_all();
        assert_eq!(sleeper.join().unwrap(), Err(Cancelled));
        assert!(started.elapsed() < Duration::from_secs(10));
        // A token taken after the cancellation is not affected by it.
        let fresh = super::token();
        assert_eq!(fresh.sleep(Duration::from_millis(1)), Ok(()));
    }
}
