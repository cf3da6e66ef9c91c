//! Log-backup retry records (C_API §7) on etcd (§9), so that a sequence begun on one host
//! continues on another with the same count, the remainder of its wait and the same budget.
//!
//! (task, command) has two keys, the hex of the task name and the command under the prefix:
//! `<prefix>log/<task>/<command>` holds the sequence (no lease: it outlives its runners),
//! and `<prefix>log-run/<task>/<command>` is the run's claim, created only when absent and
//! bound to the plugin instance's session lease (`super::session`), which the runtime keeps
//! alive while the process lives. Every save and removal is compared on the claim's
//! revision: a runner whose claim ended (its host stalled past the session) writes nothing.
//! The claim's value is the run id of the call, the same across its retries: a claim whose
//! answer was lost is found as the call's own. A failed begin_run deletes what it may have
//! written (compared on that value); the end of a run deletes its claim (compared on its
//! revision), leaving the session to the instance's other claims.

use super::client::{Conn, TxnOutcome};
use super::session::Session;
use super::EtcdClient;
use crate::error::{Error, Result};
use crate::idempotency::ClaimId;
use crate::log_backup::records::{LogRecordStore, RetryRecord, RunClaim, Sequence};
use crate::log_backup::SubCommand;
use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

const MAX_ROUNDS: usize = 32;

pub struct EtcdLogRecords {
    etcd: Arc<EtcdClient>,
    /// The instance's session: run claims are bound to its lease.
    session: Arc<Session>,
}

impl EtcdLogRecords {
    /// `lease`: how long a dead runner's claim outlives it (the plugin's `idempotency_lease`,
    /// the session's TTL).
    pub fn new(etcd: Arc<EtcdClient>, lease: Duration) -> Self {
        EtcdLogRecords {
            session: etcd.session(lease),
            etcd,
        }
    }
}

struct Keys {
    records: Vec<u8>,
    run: Vec<u8>,
}

fn keys(conn: &Conn, task: &str, command: SubCommand) -> Keys {
    let parts: [&[u8]; 2] = [task.as_bytes(), command.name().as_bytes()];
    Keys {
        records: conn.key("log", &parts),
        run: conn.key("log-run", &parts),
    }
}

fn in_progress(task: &str, command: SubCommand, what: &str) -> Error {
    Error::InProgress(format!("{} of task {task:?} {what}", command.name()))
}

pub fn encode(sequence: &Sequence) -> String {
    let mut text = String::from("s1 ");
    match sequence.outcome {
        Some(code) => {
            let _ = write!(text, "{code}");
        }
        None => text.push('-'),
    }
    let _ = writeln!(text, " {}", sequence.first_failure_ms.unwrap_or(0));
    for r in &sequence.records {
        let _ = writeln!(text, "{}", r.fields());
    }
    text
}

pub fn decode(value: &[u8]) -> Option<Sequence> {
    let text = std::str::from_utf8(value).ok()?;
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next()?.split(' ').collect();
    if head.len() != 3 || head[0] != "s1" {
        return None;
    }
    let outcome = match head[1] {
        "-" => None,
        code => Some(code.parse().ok()?),
    };
    let first: u64 = head[2].parse().ok()?;
    let mut records = Vec::new();
    for line in lines {
        records.push(RetryRecord::parse_fields(line)?);
    }
    Some(Sequence {
        records,
        outcome,
        first_failure_ms: (first > 0).then_some(first),
    })
}

/// The value of a run claim: the identity of the call that claims it (the same across its
/// retries). Earlier builds wrote `r <lease>`: never taken for a call's.
fn run_value(run: ClaimId) -> String {
    format!("run {:016x}", run.0)
}

enum RunFailure {
    Store(Error),
    /// Another runner holds it.
    Held,
    /// It kept changing hands.
    Churn,
}

/// The run's claim: created while absent, bound to the session's `lease` (a new session's
/// if it was found gone). Its revision: what the run's saves are compared on.
async fn claim_run(
    conn: &Arc<Conn>,
    session: &Arc<Session>,
    k: &Keys,
    value: &str,
    lease: &mut i64,
) -> Result<i64, RunFailure> {
    for _ in 0..MAX_ROUNDS {
        let when = Compare::create_revision(k.run.clone(), CompareOp::Equal, 0);
        let put = TxnOp::put(
            k.run.clone(),
            value,
            Some(PutOptions::new().with_lease(*lease)),
        );
        match conn
            .txn_or_get("claim a log-backup run", &k.run, when, vec![put])
            .await
            .map_err(RunFailure::Store)?
        {
            TxnOutcome::Applied { revision } => return Ok(revision),
            // An earlier attempt of this call whose answer was lost did apply.
            TxnOutcome::Found(Some(kv)) if kv.value() == value.as_bytes() => {
                crate::metrics::store().unknown_outcomes.inc();
                return Ok(kv.mod_revision());
            }
            TxnOutcome::Found(Some(_)) => return Err(RunFailure::Held),
            TxnOutcome::Found(None) => continue,
            TxnOutcome::LeaseGone => {
                session.lapsed(*lease);
                *lease = session.lease(conn).await.map_err(RunFailure::Store)?;
            }
        }
    }
    Err(RunFailure::Churn)
}

impl LogRecordStore for EtcdLogRecords {
    fn begin_run(&self, task: &str, command: SubCommand) -> Result<Box<dyn RunClaim + '_>> {
        self.begin_run_as(task, command, ClaimId::new())
    }

    fn begin_run_as(
        &self,
        task: &str,
        command: SubCommand,
        run: ClaimId,
    ) -> Result<Box<dyn RunClaim + '_>> {
        let (session, owned_task) = (self.session.clone(), task.to_string());
        let revision = self.etcd.run(move |conn| async move {
            let k = keys(&conn, &owned_task, command);
            let value = run_value(run);
            let mut lease = session.lease(&conn).await?;
            match claim_run(&conn, &session, &k, &value, &mut lease).await {
                Ok(revision) => Ok(revision),
                Err(failure) => {
                    // Nothing of this attempt may stay behind to block the next runner
                    // (an attempt applied unacknowledged): its claim is deleted while it is
                    // still this call's. If that fails too, a retry of this call finds the
                    // claim as its own; otherwise it ends with the session.
                    let when = Compare::value(k.run.clone(), CompareOp::Equal, value.clone());
                    let delete = TxnOp::delete(k.run.clone(), None);
                    let _ = conn
                        .txn_or_get("drop an unfinished run claim", &k.run, when, vec![delete])
                        .await;
                    Err(match failure {
                        RunFailure::Store(failure) => failure,
                        RunFailure::Held => in_progress(
                            &owned_task,
                            command,
                            "is being run by another runner (a dead runner's claim ends with its session lease)",
                        ),
                        RunFailure::Churn => in_progress(&owned_task, command, "kept changing hands"),
                    })
                }
            }
        })?;
        Ok(Box::new(EtcdRun {
            store: self,
            task: task.to_string(),
            command,
            revision,
        }))
    }

    fn load(&self, task: &str, command: SubCommand) -> Result<Option<Sequence>> {
        let task = task.to_string();
        self.etcd.run(move |conn| async move {
            let k = keys(&conn, &task, command);
            let Some(kv) = conn
                .get("read log-backup retry records", &k.records)
                .await?
            else {
                return Ok(None);
            };
            decode(kv.value()).map(Some).ok_or_else(|| {
                Error::Corruption(format!(
                    "etcd key {} does not hold the retry records of {} on task {task:?}",
                    String::from_utf8_lossy(&k.records),
                    command.name()
                ))
            })
        })
    }

    fn reset(&self, task: &str, command: SubCommand) -> Result<()> {
        let task = task.to_string();
        self.etcd.run(move |conn| async move {
            let k = keys(&conn, &task, command);
            for _ in 0..MAX_ROUNDS {
                // Only while no run holds (task, command): one transaction.
                let when = Compare::create_revision(k.run.clone(), CompareOp::Equal, 0);
                let delete = TxnOp::delete(k.records.clone(), None);
                match conn
                    .txn_or_get("reset log-backup retry records", &k.run, when, vec![delete])
                    .await?
                {
                    TxnOutcome::Applied { .. } => return Ok(()),
                    TxnOutcome::Found(Some(_)) => {
                        return Err(in_progress(
                            &task,
                            command,
                            "is being run right now; its records are not reset",
                        ))
                    }
                    TxnOutcome::Found(None) | TxnOutcome::LeaseGone => continue,
                }
            }
            Err(in_progress(&task, command, "kept changing hands"))
        })
    }
}

struct EtcdRun<'a> {
    store: &'a EtcdLogRecords,
    task: String,
    command: SubCommand,
    /// The revision of the run's claim: its saves are compared on it.
    revision: i64,
}

impl EtcdRun<'_> {
    /// Applies `op` to the records only while the run's claim is this run's.
    fn fenced(
        &self,
        what: &'static str,
        op: fn(Vec<u8>, Option<String>) -> TxnOp,
        value: Option<String>,
    ) -> Result<()> {
        let (task, command, revision) = (self.task.clone(), self.command, self.revision);
        self.store.etcd.run(move |conn| async move {
            let k = keys(&conn, &task, command);
            // Still this run's claim: every other claim of (task, command) has its own
            // revision, and the claim ends with the session.
            let when = Compare::mod_revision(k.run.clone(), CompareOp::Equal, revision);
            match conn
                .txn_or_get(what, &k.run, when, vec![op(k.records.clone(), value)])
                .await?
            {
                TxnOutcome::Applied { .. } => Ok(()),
                _ => Err(in_progress(
                    &task,
                    command,
                    "is no longer this run's: its claim ended with its session lease; nothing written",
                )),
            }
        })
    }
}

impl RunClaim for EtcdRun<'_> {
    fn save(&self, sequence: &Sequence) -> Result<()> {
        self.fenced(
            "save log-backup retry records",
            |key, value| TxnOp::put(key, value.unwrap_or_default(), None),
            Some(encode(sequence)),
        )
    }

    fn remove(&self) -> Result<()> {
        self.fenced(
            "remove log-backup retry records",
            |key, _| TxnOp::delete(key, None),
            None,
        )
    }
}

impl Drop for EtcdRun<'_> {
    fn drop(&mut self) {
        let (task, command, revision) = (self.task.clone(), self.command, self.revision);
        // Waited for, so that the next run of (task, command) from here finds it free. One
        // compare-and-delete: the session lease stays for the instance's other claims.
        let ended = self.store.etcd.run(move |conn| async move {
            let k = keys(&conn, &task, command);
            let when = Compare::mod_revision(k.run.clone(), CompareOp::Equal, revision);
            let delete = TxnOp::delete(k.run.clone(), None);
            conn.txn_or_get("end a log-backup run", &k.run, when, vec![delete])
                .await
                .map(|_| ())
        });
        if let Err(failure) = ended {
            tracing::warn!(task = %self.task, command = self.command.name(), reason = %failure.detail(), "log-backup run claim not deleted; it ends with the session lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_round_trip() {
        let sequence = Sequence {
            records: vec![
                RetryRecord {
                    retry_num: 1,
                    detect_failed_at_ms: 1000,
                    expected_retry_at_ms: 31_000,
                    real_retry_at_ms: 31_002,
                    reason_code: -6,
                    original_reason: "execute start failed: Network error\nline two".into(),
                },
                RetryRecord {
                    retry_num: 2,
                    detect_failed_at_ms: 31_050,
                    expected_retry_at_ms: 91_050,
                    real_retry_at_ms: 0,
                    reason_code: -99,
                    original_reason: String::new(),
                },
            ],
            outcome: None,
            first_failure_ms: Some(1000),
        };
        assert_eq!(decode(encode(&sequence).as_bytes()), Some(sequence.clone()));
        let finished = Sequence {
            outcome: Some(-12),
            ..sequence
        };
        assert_eq!(decode(encode(&finished).as_bytes()), Some(finished));
        assert_eq!(decode(b"s2 - 0\n"), None);
        assert_eq!(decode(b"s1 - 0\n1 2 3\n"), None);
    }
}
