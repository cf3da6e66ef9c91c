//! Time sources, injectable so that retry, lease and TTL logic is tested without real waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync {
    /// Wall-clock milliseconds since the Unix epoch (persisted and logged values).
    fn unix_ms(&self) -> u64;
    /// Milliseconds from an arbitrary origin that never goes backwards (in-process budgets).
    fn monotonic_ms(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Clock for SystemClock {
    fn unix_ms(&self) -> u64 {
        unix_ms_now()
    }

    fn monotonic_ms(&self) -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
    }
}

/// A clock that only moves when told to; shared by a test and the code under test.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn new(start_unix_ms: u64) -> Self {
        ManualClock {
            now_ms: Arc::new(AtomicU64::new(start_unix_ms)),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.now_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    /// Sets the time, also backwards (a wall clock stepped by an operator or NTP).
    pub fn set_unix_ms(&self, unix_ms: u64) {
        self.now_ms.store(unix_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn unix_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    fn monotonic_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}
