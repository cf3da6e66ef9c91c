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
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Writes per transaction: etcd refuses more than `--max-txn-ops` (128 by default) of
/// each kind.
const MAX_BATCH: usize = 64;
/// Batches in flight at once: the next one forms while these are answered.
const IN_FLIGHT: usize = 2;
/// How long the next batch waits for one of them at most (a transaction takes a few ms).
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

pub struct Write {
    pub key: Vec<u8>,
    pub expected: i64,
    pub put: TxnOp,
    /// `None`: unresolved (not applied because of another write of its batch).
    pub reply: oneshot::Sender<Result<Option<TxnOutcome>, Error>>,
}

pub type Queue = mpsc::UnboundedSender<Write>;

/// Starts the combiner of `conn` on the current runtime.
pub fn start(conn: &Arc<Conn>) -> Queue {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(combine(Arc::downgrade(conn), rx));
    tx
}

async fn combine(conn: Weak<Conn>, mut queue: mpsc::UnboundedReceiver<Write>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // Writes of a key already in the batch being formed: the next batch's.
    let mut later: VecDeque<Write> = VecDeque::new();
    loop {
        let first = match later.pop_front() {
            Some(write) => write,
            None => match queue.recv().await {
                Some(write) => write,
                None => return,
            },
        };
        // A batch stuck on a failing member (up to `etcd_timeout`) must not hold up the
        // writes behind it: past a short wait they go without a slot.
        let slot = tokio::time::timeout(SLOT_WAIT, slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let next = match later.pop_front() {
                Some(write) => write,
                None => match queue.try_recv() {
                    Ok(write) => write,
                    Err(_) => break,
                },
            };
            if batch.iter().any(|w| w.key == next.key) {
                later.push_back(next);
                if later.len() > MAX_BATCH {
                    break;
                }
            } else {
                batch.push(next);
            }
        }
        let Some(conn) = conn.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            run(&conn, batch).await;
            drop(slot);
        });
    }
}

async fn run(conn: &Conn, mut batch: Vec<Write>) {
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
