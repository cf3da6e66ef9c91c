//! `store stats | verify | compact` (docs/C_API.md §11): the embedded file store.

use super::{Backend, CliError, Ctx, Done, StoreCommand};
use backup_coordinator_core::idempotency::file_store::{self, FileIdempotencyStore, Verified};
use backup_coordinator_core::idempotency::KeyState;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

pub fn run(ctx: &Ctx, command: &StoreCommand) -> Result<Done, CliError> {
    let Backend::File(dir) = ctx.backend()? else {
        return Err(CliError(
            "store commands are for the file store (state_dir); this config uses etcd, whose own tools (etcdctl) report and compact its space".to_string(),
        ));
    };
    match command {
        StoreCommand::Stats => stats(ctx, &dir),
        StoreCommand::Verify => verify(ctx, &dir),
        StoreCommand::Compact { reason } => compact(ctx, &dir, reason),
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn stats(ctx: &Ctx, dir: &Path) -> Result<Done, CliError> {
    let idem = dir.join("idempotency");
    let (mut claimed, mut completed, mut expired) = (0u64, 0u64, 0u64);
    if let Some(store) = ctx.file_store(dir)? {
        store.each_record(
            |_, record| match (record.is_live(ctx.now_ms), record.state) {
                (false, _) => expired += 1,
                (true, KeyState::Claimed { .. }) => claimed += 1,
                (true, KeyState::Completed { .. }) => completed += 1,
            },
        )?;
    }
    let keys = claimed + completed;
    let journal_bytes = file_len(&idem.join("journal"));
    let index_bytes = file_len(&idem.join("index"));
    let per_key = journal_bytes.checked_div(keys);
    let mut text = String::new();
    let _ = writeln!(text, "store:          {}", idem.display());
    let _ = writeln!(
        text,
        "keys:           {keys} live ({claimed} claimed, {completed} completed), {expired} expired not yet compacted away"
    );
    let _ = writeln!(text, "journal bytes:  {journal_bytes}");
    let _ = writeln!(
        text,
        "bytes per key:  {}",
        per_key.map_or("-".to_string(), |b| b.to_string())
    );
    let _ = writeln!(text, "index image:    {index_bytes} bytes");
    let json = json!({
        "store": idem.display().to_string(),
        "keys": keys,
        "claimed": claimed,
        "completed": completed,
        "expired": expired,
        "journal_bytes": journal_bytes,
        "index_bytes": index_bytes,
        "bytes_per_key": per_key,
    });
    Ok(Done::ok(text, json))
}

fn verify(ctx: &Ctx, dir: &Path) -> Result<Done, CliError> {
    let idem = dir.join("idempotency");
    if !idem.join("journal").exists() {
        let text = format!(
            "{}: no journal (nothing was ever claimed): nothing to verify\n",
            idem.display()
        );
        return Ok(Done::ok(
            text,
            json!({ "store": idem.display().to_string(), "ok": true, "records": 0, "bytes": 0 }),
        ));
    }
    // A progress bar on a terminal only (and never in the middle of JSON).
    let bar = (std::io::stderr().is_terminal() && !ctx.json).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "verifying {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("a valid template"),
        );
        bar
    });
    let started = Instant::now();
    let verified = file_store::verify(dir, |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(report(&verified, seconds))
}

/// The text and JSON of a verification; refused (exit 1) on corruption.
fn report(v: &Verified, seconds: f64) -> Done {
    let rate = if seconds > 0.0 {
        v.records as f64 / seconds
    } else {
        0.0
    };
    let mut text = String::new();
    let journal = v.journal.display();
    let _ = writeln!(
        text,
        "journal {journal}: {} records, {} bytes checked in {seconds:.2} s ({rate:.0} records/s)",
        v.records, v.bytes
    );
    let mut problems = Vec::new();
    if let Some(at) = v.corrupt_at {
        let why = format!(
            "journal {journal}: the record at byte {at} does not check (good records follow it: corruption)"
        );
        let _ = writeln!(text, "CORRUPT: {why}");
        problems.push(why);
    }
    if let Some(at) = v.torn_at {
        let _ = writeln!(
            text,
            "torn end at byte {at}: a writer died mid-write; the store cuts it off when it next opens (not corruption)"
        );
    }
    match &v.counters {
        Ok((issued, floor)) => {
            let _ = writeln!(
                text,
                "tokens {}: last issued {issued}, durable floor {floor}: OK",
                v.tokens.display()
            );
        }
        Err(why) => {
            let _ = writeln!(text, "CORRUPT: {why}");
            problems.push(why.clone());
        }
    }
    if problems.is_empty() {
        let _ = writeln!(text, "OK");
    }
    let json = json!({
        "ok": problems.is_empty(),
        "journal": v.journal.display().to_string(),
        "records": v.records,
        "bytes": v.bytes,
        "seconds": seconds,
        "records_per_second": rate,
        "corrupt_at": v.corrupt_at,
        "torn_at": v.torn_at,
        "tokens": v.tokens.display().to_string(),
        "tokens_ok": v.counters.is_ok(),
        "problems": problems,
    });
    match problems.first() {
        None => Done::ok(text, json),
        Some(first) => {
            let why = first.clone();
            Done::refused(text, json, why)
        }
    }
}

fn compact(ctx: &Ctx, dir: &Path, reason: &str) -> Result<Done, CliError> {
    let journal = dir.join("idempotency").join("journal");
    let Ok(meta) = std::fs::metadata(&journal) else {
        let text = "no journal: nothing to compact\n".to_string();
        return Ok(Done::ok(
            text,
            json!({ "compacted": false, "before_bytes": 0, "after_bytes": 0 }),
        ));
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        let why = format!(
            "not compacted: {} belongs to uid {}, and this runs as uid {me}; a compacted journal \
             would belong to uid {me} and lock the plugin out: run as the user taosX runs as",
            journal.display(),
            meta.uid()
        );
        let json = json!({ "compacted": false, "reason": why });
        return Ok(Done::refused(String::new(), json, why));
    }
    let store: FileIdempotencyStore = ctx.file_store(dir)?.expect("the journal exists");
    let before = store.journal_len();
    let started = Instant::now();
    store.compact_now(ctx.now_ms)?;
    let after = store.journal_len();
    let what = format!(
        "compacted {}: {before} -> {after} bytes in {:.3} s",
        journal.display(),
        started.elapsed().as_secs_f64()
    );
    super::note_change(ctx, &what, reason);
    let json = json!({
        "compacted": true,
        "journal": journal.display().to_string(),
        "before_bytes": before,
        "after_bytes": after,
        "reason": reason,
    });
    Ok(Done::ok(what + "\n", json))
}
