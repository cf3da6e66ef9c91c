//! `records list | show TASK [CMD] | reset TASK CMD` (docs/C_API.md §11): the log-backup
//! retry records (docs/C_API.md §7).

use super::fmt::{span, utc};
use super::keys::table;
use super::{Backend, CliError, Ctx, Done, RecordsCommand};
use backup_coordinator_core::log_backup::records::{
    FileLogRecords, ListedRecords, LogRecordStore, Sequence,
};
use backup_coordinator_core::log_backup::SubCommand;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;

pub fn run(ctx: &Ctx, command: &RecordsCommand) -> Result<Done, CliError> {
    let backend = ctx.backend()?;
    let (files, store): (Option<FileLogRecords>, Box<dyn LogRecordStore>) = match &backend {
        Backend::File(dir) => (
            Some(FileLogRecords::new(dir)),
            Box::new(FileLogRecords::new(dir)),
        ),
        Backend::Etcd(etcd) => (None, etcd.log_records()),
    };
    match command {
        RecordsCommand::List => match (&files, &backend) {
            (Some(files), _) => list(ctx, &files.list()?),
            (None, Backend::Etcd(etcd)) => {
                let listed = super::etcd_keys::list_records(etcd)?
                    .into_iter()
                    .map(|(task, command, sequence)| {
                        let place = format!("etcd {task}/{command}");
                        let content = sequence
                            .map(|s| (task.into_bytes(), command, s))
                            .map_err(backup_coordinator_core::error::Error::Corruption);
                        (PathBuf::from(place), content)
                    })
                    .collect::<Vec<_>>();
                list(ctx, &listed)
            }
            (None, Backend::File(_)) => unreachable!("a file backend has its record store"),
        },
        RecordsCommand::Show { task, command } => show(ctx, store.as_ref(), task, *command),
        RecordsCommand::Reset {
            task,
            command,
            reason,
        } => reset(ctx, store.as_ref(), task, *command, reason),
    }
}

fn outcome_text(sequence: &Sequence) -> String {
    match sequence.outcome {
        None => "unfinished".to_string(),
        Some(0) => "succeeded".to_string(),
        Some(code) => format!("gave up ({code})"),
    }
}

fn sequence_json(task: &str, command: &str, sequence: &Sequence) -> Value {
    json!({
        "task": task,
        "command": command,
        "outcome": sequence.outcome,
        "finished": sequence.outcome.is_some(),
        "first_failure_ms": sequence.first_failure_ms,
        "records": sequence.records.iter().map(|r| json!({
            "retry_num": r.retry_num,
            "detect_failed_at_ms": r.detect_failed_at_ms,
            "expected_retry_at_ms": r.expected_retry_at_ms,
            "real_retry_at_ms": r.real_retry_at_ms,
            "reason_code": r.reason_code,
            "original_reason": r.original_reason,
        })).collect::<Vec<_>>(),
    })
}

fn list(ctx: &Ctx, listed: &[ListedRecords]) -> Result<Done, CliError> {
    let mut rows = Vec::new();
    let mut entries = Vec::new();
    let mut corrupt = Vec::new();
    for (path, content) in listed {
        match content {
            Ok((task, command, sequence)) => {
                let task = String::from_utf8_lossy(task);
                let first = sequence.first_failure_ms.map_or("-".to_string(), |ms| {
                    format!("{} ({} ago)", utc(ms), span(ctx.now_ms.saturating_sub(ms)))
                });
                rows.push([
                    task.to_string(),
                    command.clone(),
                    sequence.records.len().to_string(),
                    outcome_text(sequence),
                    first,
                ]);
                let mut entry = sequence_json(&task, command, sequence);
                entry["file"] = json!(path.display().to_string());
                entries.push(entry);
            }
            Err(failure) => corrupt.push(json!({
                "file": path.display().to_string(),
                "error": failure.detail(),
            })),
        }
    }
    let mut text = table(
        ["TASK", "COMMAND", "RECORDS", "OUTCOME", "FIRST FAILURE"],
        &rows,
    );
    let _ = writeln!(text, "{} record set(s)", rows.len());
    for bad in &corrupt {
        let _ = writeln!(text, "corrupt: {}", bad["error"].as_str().unwrap_or(""));
    }
    let json = json!({ "count": entries.len(), "records": entries, "corrupt": corrupt });
    if corrupt.is_empty() {
        Ok(Done::ok(text, json))
    } else {
        let why = format!("{} record file(s) do not parse", corrupt.len());
        Ok(Done::refused(text, json, why))
    }
}

fn show(
    _ctx: &Ctx,
    store: &dyn LogRecordStore,
    task: &str,
    command: Option<SubCommand>,
) -> Result<Done, CliError> {
    let commands: Vec<SubCommand> = match command {
        Some(command) => vec![command],
        None => SubCommand::ALL.to_vec(),
    };
    let mut text = String::new();
    let mut found = Vec::new();
    for command in commands {
        let Some(sequence) = store.load(task, command)? else {
            continue;
        };
        let _ = writeln!(
            text,
            "{task} {}: {} record(s), {}",
            command.name(),
            sequence.records.len(),
            outcome_text(&sequence)
        );
        for r in &sequence.records {
            let ran = match r.real_retry_at_ms {
                0 => "not run yet".to_string(),
                ms => format!("ran {}", utc(ms)),
            };
            let _ = writeln!(
                text,
                "  #{}  failed {}  retry due {}  {ran}  code {}  {}",
                r.retry_num,
                utc(r.detect_failed_at_ms),
                utc(r.expected_retry_at_ms),
                r.reason_code,
                r.original_reason
            );
        }
        found.push(sequence_json(task, command.name(), &sequence));
    }
    if found.is_empty() {
        let _ = writeln!(text, "{task}: no retry records");
    }
    Ok(Done::ok(text, json!({ "task": task, "records": found })))
}

fn reset(
    ctx: &Ctx,
    store: &dyn LogRecordStore,
    task: &str,
    command: SubCommand,
    reason: &str,
) -> Result<Done, CliError> {
    let before = store.load(task, command)?;
    let Some(before) = before else {
        let text = format!(
            "{task} {}: no retry records; nothing reset\n",
            command.name()
        );
        let json = json!({ "task": task, "command": command.name(), "reset": false, "removed": 0 });
        return Ok(Done::ok(text, json));
    };
    // Refused (IN_PROGRESS) while a run holds (task, command): nothing removed then.
    if let Err(failure) = store.reset(task, command) {
        let why = format!("not reset: {}", failure.detail());
        let json =
            json!({ "task": task, "command": command.name(), "reset": false, "reason": why });
        return Ok(Done::refused(String::new(), json, why));
    }
    let what = format!(
        "reset the retry records of {task} {} ({} record(s), {})",
        command.name(),
        before.records.len(),
        outcome_text(&before)
    );
    super::note_change(ctx, &what, reason);
    let json = json!({
        "task": task,
        "command": command.name(),
        "reset": true,
        "removed": before.records.len(),
        "reason": reason,
    });
    Ok(Done::ok(what + "\n", json))
}
