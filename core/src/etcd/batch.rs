//! Concurrent conditional writes of one process, combined into shared transactions (group
//! commit): while a transaction is in flight, the writes that callers queue meanwhile go
//! out together in the next one, so that one raft write carries many keys. Used by the
//! first attempt of claims and of completions. The puts of one transaction share its
//! revision, so the claims of one batch share a fencing token: allowed, since tokens only
//! need to grow per key (docs/C_API.md §8.1) and a batch never holds two writes of one key
//! (a second one waits for the next batch); the lease keeper and the store hold each claim
//! by its key and token.
//!
//! Each write is "put `put` if the key's `mod_revision` is `expected`" (0: the key is
//! absent). etcd applies a transaction's writes only if every one of its compares holds, so
//! a batch that fails reads every key back in its "else" branch: a write whose own compare
//! did not hold gets the key as found (what a transaction of its own would have answered);
//! one whose compare held, but that failed with the others, is answered "unresolved" and its
//! caller tries it again alone (so is every write of a batch refused for a lease that is
//! gone: only a transaction of its own tells whose lease it was). A failure of the request
//! itself reaches every write of the batch, as it would have reached each of them alone: a
//! lost answer is resolved by reading back, as for a single transaction (a claim finds its
//! own claim id, a completion its token).

use super::client::{is_lease_not_found, Conn, TxnOutcome};
use crate::error::Error;
use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Writes per transaction: etcd refuses more than `--max-txn-ops` (128 by default) of
/// each kind.
const MAX_BATCH: usize = 64;
/// How long a batch waits for the writers its predecessor just answered to come back
/// (their next write: a claim's completion, the next key's claim), at most. A few wake-ups
/// of a thread; a transaction takes a millisecond or more.
const REGROUP: Duration = Duration::from_micros(200);
/// Writers that come back later than this after their answer are taken to be busy
/// elsewhere (in the operation between a claim and its completion), not regrouped.
const COMING_BACK: Duration = Duration::from_millis(2);
/// How long the next batch waits for the one in flight at most: a batch stuck on a failing
/// member (up to `etcd_timeout`) must not hold up the writes behind it.
const SLOT_WAIT: Duration = Duration::from_millis(50);

pub struct Write {
    pub key: Vec<u8>,
    pub expected: i64,
    pub put: TxnOp,
    /// `None`: unresolved (not applied because of another write of its batch).
    pub reply: oneshot::Sender<Result<Option<TxnOutcome>, Error>>,
    pub queued: Instant,
}

pub type Queue = mpsc::UnboundedSender<Write>;

/// Starts the combiner of `conn` on the current runtime.
pub fn start(conn: &Arc<Conn>) -> Queue {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(combine(Arc::downgrade(conn), rx));
    tx
}

/// The batch last sent: how many writes it held, and when its answer came.
struct Previous {
    writes: usize,
    answered: Mutex<Option<Instant>>,
}

/// One batch in flight at a time: the writes queued meanwhile form the next one. With only
/// that, callers that each wait for their write before queuing the next split into two
/// groups that take turns (each group's writes queue while the other's are in flight), and
/// every transaction carries half of them. So a batch that follows an answered one also
/// waits, for `REGROUP` at most, for as many writes as that one answered: its callers
/// coming back. A lone caller never waits (nothing was queued while its write was out).
async fn combine(conn: Weak<Conn>, mut queue: mpsc::UnboundedReceiver<Write>) {
    let slot = Arc::new(Semaphore::new(1));
    // Writes of a key already in the batch being formed: the next batch's.
    let mut later: VecDeque<Write> = VecDeque::new();
    let mut previous = Arc::new(Previous {
        writes: 0,
        answered: Mutex::new(None),
    });
    loop {
        let first = match later.pop_front() {
            Some(write) => write,
            None => match queue.recv().await {
                Some(write) => write,
                None => return,
            },
        };
        let permit = tokio::time::timeout(SLOT_WAIT, slot.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        let mut batch = vec![first];
        take_queued(&mut batch, &mut later, &mut queue);
        let answered = *previous.answered.lock();
        if let Some(answered) = answered.filter(|a| a.elapsed() < COMING_BACK) {
            // Writes queued before the answer are other callers'; the answered ones come
            // back after it.
            let waited = batch.iter().filter(|w| w.queued < answered).count();
            let expected = (waited + previous.writes).min(MAX_BATCH);
            regroup(&mut batch, &mut later, &mut queue, expected).await;
        }
        let Some(conn) = conn.upgrade() else {
            return;
        };
        previous = Arc::new(Previous {
            writes: batch.len(),
            answered: Mutex::new(None),
        });
        let sent = previous.clone();
        tokio::spawn(async move {
            run(&conn, batch, &sent).await;
            drop(permit);
        });
    }
}

/// Adds `write` to `batch`, or keeps it for the next one if its key is already there.
/// False once the batch is full or too many writes wait for the next one.
fn add(batch: &mut Vec<Write>, later: &mut VecDeque<Write>, write: Write) -> bool {
    if batch.iter().any(|w| w.key == write.key) {
        later.push_back(write);
    } else {
        batch.push(write);
    }
    batch.len() < MAX_BATCH && later.len() <= MAX_BATCH
}

/// Adds the writes already queued.
fn take_queued(
    batch: &mut Vec<Write>,
    later: &mut VecDeque<Write>,
    queue: &mut mpsc::UnboundedReceiver<Write>,
) {
    let mut room = batch.len() < MAX_BATCH;
    // Writes kept back from the last batch go first, each at most once.
    for _ in 0..later.len() {
        if !room {
            return;
        }
        let write = later.pop_front().expect("counted");
        room = add(batch, later, write);
    }
    while room {
        match queue.try_recv() {
            Ok(write) => room = add(batch, later, write),
            Err(_) => return,
        }
    }
}

/// Waits, `REGROUP` at most, until `batch` holds `expected` writes. A short spin that
/// yields to the runtime: tokio's timers count whole milliseconds.
async fn regroup(
    batch: &mut Vec<Write>,
    later: &mut VecDeque<Write>,
    queue: &mut mpsc::UnboundedReceiver<Write>,
    expected: usize,
) {
    let since = Instant::now();
    while batch.len() < expected && since.elapsed() < REGROUP {
        match queue.try_recv() {
            Ok(write) => {
                if !add(batch, later, write) {
                    return;
                }
            }
            Err(mpsc::error::TryRecvError::Empty) => tokio::task::yield_now().await,
            Err(mpsc::error::TryRecvError::Disconnected) => return,
        }
    }
}

async fn run(conn: &Conn, mut batch: Vec<Write>, sent: &Previous) {
    if batch.len() == 1 {
        let write = batch.pop().expect("one write");
        let when = Compare::mod_revision(write.key.clone(), CompareOp::Equal, write.expected);
        let outcome = conn
            .txn_or_get(
                "write an idempotency key",
                &write.key,
                when,
                vec![write.put],
            )
            .await;
        *sent.answered.lock() = Some(Instant::now());
        let _ = write.reply.send(outcome.map(Some));
        return;
    }
    let txn = Txn::new()
        .when(
            batch
                .iter()
                .map(|w| Compare::mod_revision(w.key.clone(), CompareOp::Equal, w.expected))
                .collect::<Vec<_>>(),
        )
        .and_then(batch.iter().map(|w| w.put.clone()).collect::<Vec<_>>())
        .or_else(
            batch
                .iter()
                .map(|w| TxnOp::get(w.key.clone(), None))
                .collect::<Vec<_>>(),
        );
    let answered = conn
        .request("write idempotency keys together", |mut client| {
            let txn = txn.clone();
            async move {
                match client.txn(txn).await {
                    Ok(response) => Ok(Ok(response)),
                    Err(error) if is_lease_not_found(&error) => Ok(Err(())),
                    Err(error) => Err(error),
                }
            }
        })
        .await;
    *sent.answered.lock() = Some(Instant::now());
    match answered {
        Ok(Ok(response)) if response.succeeded() => {
            let revision = response.header().map_or(0, |h| h.revision());
            for write in batch {
                let _ = write.reply.send(Ok(Some(TxnOutcome::Applied { revision })));
            }
        }
        Ok(Ok(response)) => {
            let mut found = response.op_responses().into_iter().map(|op| match op {
                TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
                _ => None,
            });
            for write in batch {
                let kv = found.next().flatten();
                let current = kv.as_ref().map_or(0, |kv| kv.mod_revision());
                let outcome = if current == write.expected {
                    None
                } else {
                    Some(TxnOutcome::Found(kv))
                };
                let _ = write.reply.send(Ok(outcome));
            }
        }
        // A lease of one of the writes is gone, not necessarily each one's: each tries
        // alone, and learns whether it was its own.
        Ok(Err(())) => {
            for write in batch {
                let _ = write.reply.send(Ok(None));
            }
        }
        Err(failure) => {
            for write in batch {
                let _ = write.reply.send(Err(failure.clone()));
            }
        }
    }
}
