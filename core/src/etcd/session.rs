//! The plugin instance's etcd session: one lease per client and TTL, shared by every claim
//! the instance makes (idempotency claims and log-backup run claims), as etcd's own
//! concurrency package does. Granted on first use, kept alive by a task on the runtime
//! thread while the process lives; a dead or stalled host stops renewing it, and every claim
//! bound to it goes with it when it lapses. Found gone (a keep-alive or a put answers "lease
//! not found"), it is forgotten and the next claim grants a new one.
//!
//! The lease keeper's view of a claim (docs/C_API.md §8.1) starts when the claim was sent
//! and moves on when an acknowledged renewal was sent: the store vouches for that by
//! [`Session::renewed_since`], an acknowledged keep-alive of the session sent no earlier
//! than a given instant. Keep-alives are not raft writes (the leader answers them), and
//! concurrent callers share one: a caller whose instant is covered by a keep-alive already
//! acknowledged, or sent after it, waits for that one instead of sending its own.

use super::client::{Conn, KeepAlive};
use crate::error::Result;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

pub struct Session {
    ttl: Duration,
    state: Mutex<State>,
    /// One grant at a time.
    granting: tokio::sync::Mutex<()>,
    /// One keep-alive at a time: the callers behind it are served by it or the next one.
    /// Holds the open keep-alive stream of the lease, if any.
    renewing: tokio::sync::Mutex<Option<KeepAlive>>,
    /// For tests: a host whose process stalled renews nothing in the background.
    stalled: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    current: Option<Live>,
}

#[derive(Clone, Copy)]
struct Live {
    lease: i64,
    /// When the grant or the last acknowledged keep-alive of `lease` was sent.
    acked_sent: Instant,
}

impl Session {
    /// `stalled`: the client's "stalled" switch, for tests.
    pub fn new(ttl: Duration, stalled: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Session {
            ttl,
            state: Mutex::new(State::default()),
            granting: tokio::sync::Mutex::new(()),
            renewing: tokio::sync::Mutex::new(None),
            stalled,
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often the runtime renews the session: every sixth of the TTL, half the lease
    /// keeper's renewal period, so that a claim vouched for by the last renewal (which is
    /// at most this old while the session is kept alive) leaves the keeper a whole
    /// renewal period to renew it before its view lapses, as for any claim it holds.
    pub fn keep_alive_interval(&self) -> Duration {
        (self.ttl / 6).max(Duration::from_millis(100))
    }

    /// The session's lease, granted now if there is none (on the runtime: the keep-alive
    /// task is spawned there).
    pub async fn lease(self: &Arc<Self>, conn: &Arc<Conn>) -> Result<i64> {
        if let Some(live) = self.state.lock().current {
            return Ok(live.lease);
        }
        let _turn = self.granting.lock().await;
        if let Some(live) = self.state.lock().current {
            return Ok(live.lease);
        }
        let sent = Instant::now();
        let lease = conn.grant("grant the session lease", self.ttl).await?;
        self.state.lock().current = Some(Live {
            lease,
            acked_sent: sent,
        });
        tokio::spawn(keep_alive(Arc::downgrade(self), conn.clone(), lease));
        Ok(lease)
    }

    /// The session's lease if it is live as far as this handle knows.
    pub fn current(&self) -> Option<i64> {
        self.state.lock().current.map(|live| live.lease)
    }

    /// When the last acknowledged keep-alive (or the grant) of `lease` was sent, if `lease`
    /// is the session as far as this handle knows: its lease lasts a TTL from then at least.
    pub fn acked_sent(&self, lease: i64) -> Option<Instant> {
        match self.state.lock().current {
            Some(live) if live.lease == lease => Some(live.acked_sent),
            _ => None,
        }
    }

    /// `lease` was found gone (a put bound to it was refused): forgotten, so that the next
    /// claim grants a new session.
    pub fn lapsed(&self, lease: i64) {
        let mut state = self.state.lock();
        if state.current.is_some_and(|live| live.lease == lease) {
            state.current = None;
            tracing::warn!(
                lease,
                "etcd session lease lapsed: every claim of this host bound to it is gone"
            );
        }
    }

    /// Whether `lease` is the session and a keep-alive of it sent at or after `since` was
    /// acknowledged (sending one if none was): `Ok(false)` once the lease is gone.
    pub async fn renewed_since(&self, conn: &Conn, lease: i64, since: Instant) -> Result<bool> {
        if let Some(answer) = self.known(lease, since) {
            return Ok(answer);
        }
        let mut open = self.renewing.lock().await;
        if let Some(answer) = self.known(lease, since) {
            return Ok(answer);
        }
        let sent = Instant::now();
        // On the stream left open by the last renewal; a new one if it failed.
        let answered = match open.as_mut().filter(|open| open.lease == lease) {
            Some(stream) => stream.renew(conn.attempt_budget()).await,
            None => None,
        };
        let alive = match answered {
            Some(alive) => alive,
            None => {
                *open = None;
                match conn
                    .open_keep_alive("renew the session lease", lease)
                    .await?
                {
                    Some(stream) => {
                        *open = Some(stream);
                        true
                    }
                    None => false,
                }
            }
        };
        if alive {
            let mut state = self.state.lock();
            if let Some(live) = state.current.as_mut().filter(|live| live.lease == lease) {
                live.acked_sent = live.acked_sent.max(sent);
            }
            Ok(true)
        } else {
            self.lapsed(lease);
            Ok(false)
        }
    }

    /// What is known without asking: renewed since `since` (`true`), gone (`false`).
    fn known(&self, lease: i64, since: Instant) -> Option<bool> {
        match self.state.lock().current {
            Some(live) if live.lease == lease => (live.acked_sent >= since).then_some(true),
            // Leases are never reused: one that is no longer the session's is gone.
            _ => Some(false),
        }
    }
}

/// Keeps the session alive every TTL/6 while the client lives, and after a failed renewal
/// at once again (after a short pause), so that an outage shorter than the lease's remainder
/// never lets it lapse. Each renewal is cut off after a third of the TTL: one that hangs
/// never eats the lease. Ends when the lease is found gone (the next claim grants a new session).
async fn keep_alive(session: Weak<Session>, conn: Arc<Conn>, lease: i64) {
    let Some((ttl, period)) = session.upgrade().map(|s| (s.ttl, s.keep_alive_interval())) else {
        return;
    };
    let cutoff = (ttl / 3).max(Duration::from_millis(200));
    let pause = (period / 4).max(Duration::from_millis(20));
    let mut next = tokio::time::Instant::now() + period;
    loop {
        tokio::time::sleep_until(next).await;
        let Some(session) = session.upgrade() else {
            return;
        };
        if session.stalled.load(Ordering::Relaxed) {
            next = tokio::time::Instant::now() + pause;
            continue;
        }
        let sent = tokio::time::Instant::now();
        let renewed =
            tokio::time::timeout(cutoff, session.renewed_since(&conn, lease, sent.into_std()))
                .await;
        match renewed {
            Ok(Ok(true)) => next = sent + period,
            Ok(Ok(false)) => return,
            Ok(Err(failure)) => {
                tracing::warn!(lease, reason = %failure.detail(), "etcd session lease not renewed; retrying");
                next = tokio::time::Instant::now() + pause;
            }
            Err(_) => {
                tracing::warn!(
                    lease,
                    "etcd session lease not renewed within a renewal period; retrying"
                );
                next = tokio::time::Instant::now() + pause;
            }
        }
    }
}
