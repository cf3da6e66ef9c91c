//! `keys list | show | why | release | forget` (docs/C_API.md §11).

use super::fmt::{key_json, key_text, left_text, span, state_name, token_of, utc};
use super::{Backend, CliError, Ctx, Done, KeysCommand, StateFilter};
use backup_coordinator_core::etcd::EtcdBackend;
use backup_coordinator_core::hex::hex;
use backup_coordinator_core::idempotency::file_store::FileIdempotencyStore;
use backup_coordinator_core::idempotency::{
    same_fingerprint, shown_fingerprint, ClaimToken, Fingerprint, Forgotten, IdempotencyStore,
    KeyRecord, KeyState,
};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::Arc;

/// Where the keys are.
enum Keys {
    /// `None`: no store under `state_dir` yet (nothing was ever claimed).
    File(Option<Box<FileIdempotencyStore>>),
    Etcd(Arc<dyn IdempotencyStore>, EtcdBackend),
}

/// Neither store records who owns a claim (no pid, no host): said so.
const OWNER_UNKNOWN: &str = "owner unknown (the store records no owner pid or host)";

impl Keys {
    fn open(ctx: &Ctx) -> Result<Keys, CliError> {
        Ok(match ctx.backend()? {
            Backend::File(dir) => Keys::File(ctx.file_store(&dir)?.map(Box::new)),
            Backend::Etcd(etcd) => Keys::Etcd(etcd.idempotency_store(), etcd),
        })
    }

    fn store(&self) -> Option<&dyn IdempotencyStore> {
        match self {
            Keys::File(store) => store.as_deref().map(|s| s as &dyn IdempotencyStore),
            Keys::Etcd(store, _) => Some(store.as_ref()),
        }
    }

    /// The key's record: on the file store whatever its age (an expired one says why a
    /// call would run); on etcd the live one (etcd drops the rest itself).
    fn record(&self, key: &[u8], now_ms: u64) -> Result<Option<KeyRecord>, CliError> {
        Ok(match self {
            Keys::File(None) => None,
            Keys::File(Some(store)) => store.record_of(key)?,
            Keys::Etcd(store, _) => store.get(key, now_ms)?,
        })
    }

    /// The live keys that `keep` keeps, sorted by key (only those are held in memory).
    fn list(
        &self,
        now_ms: u64,
        keep: impl Fn(&[u8], &KeyRecord) -> bool + Send + 'static,
    ) -> Result<Vec<(Vec<u8>, KeyRecord)>, CliError> {
        match self {
            Keys::File(None) => Ok(Vec::new()),
            Keys::File(Some(store)) => {
                let mut kept = Vec::new();
                store.each_record(|key, record| {
                    if record.is_live(now_ms) && keep(key, record) {
                        kept.push((key.to_vec(), *record));
                    }
                })?;
                kept.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                Ok(kept)
            }
            Keys::Etcd(_, etcd) => {
                let mut kept = super::etcd_keys::list(etcd, now_ms, keep)?;
                kept.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                Ok(kept)
            }
        }
    }
}

pub fn run(ctx: &Ctx, command: &KeysCommand) -> Result<Done, CliError> {
    let keys = Keys::open(ctx)?;
    match command {
        KeysCommand::List {
            state,
            older_than,
            prefix,
        } => list(ctx, &keys, *state, *older_than, prefix.as_deref()),
        KeysCommand::Show { key } => show(ctx, &keys, key.as_bytes()),
        KeysCommand::Why { key, fingerprint } => {
            why(ctx, &keys, key.as_bytes(), fingerprint.as_deref())
        }
        KeysCommand::Release {
            key,
            if_token,
            reason,
        } => release(ctx, &keys, key.as_bytes(), *if_token, reason),
        KeysCommand::Forget { key, reason } => forget(ctx, &keys, key.as_bytes(), reason),
    }
}

/// How long ago the record was claimed (last renewed) or completed, from the configured
/// lease and TTL.
fn age_ms(now_ms: u64, lease_ms: u64, ttl_ms: u64, record: &KeyRecord) -> u64 {
    let since = match record.state {
        KeyState::Claimed { lease_until_ms, .. } => lease_until_ms.saturating_sub(lease_ms),
        KeyState::Completed { expires_at_ms, .. } => expires_at_ms.saturating_sub(ttl_ms),
    };
    now_ms.saturating_sub(since)
}

fn list(
    ctx: &Ctx,
    keys: &Keys,
    state: Option<StateFilter>,
    older_than: Option<u64>,
    prefix: Option<&str>,
) -> Result<Done, CliError> {
    let prefix = prefix.map(|p| p.as_bytes().to_vec());
    let (now_ms, lease_ms, ttl_ms) = (ctx.now_ms, ctx.lease_ms(), ctx.ttl_ms());
    let listed = keys.list(ctx.now_ms, move |key, record| {
        prefix.as_ref().map_or(true, |p| key.starts_with(p))
            && matches!(
                (state, record.state),
                (None, _)
                    | (Some(StateFilter::Claimed), KeyState::Claimed { .. })
                    | (Some(StateFilter::Completed), KeyState::Completed { .. })
            )
            && older_than.map_or(true, |min| age_ms(now_ms, lease_ms, ttl_ms, record) > min)
    })?;
    let rows: Vec<[String; 5]> = listed
        .iter()
        .map(|(key, record)| {
            [
                key_text(key),
                state_name(record).to_string(),
                token_of(record).to_string(),
                hex(&record.fingerprint[..8]),
                left_text(record, ctx.now_ms),
            ]
        })
        .collect();
    let mut text = table(
        ["KEY", "STATE", "TOKEN", "FINGERPRINT", "LEASE / EXPIRY"],
        &rows,
    );
    let _ = writeln!(
        text,
        "{} key{}",
        listed.len(),
        if listed.len() == 1 { "" } else { "s" }
    );
    let json = json!({
        "count": listed.len(),
        "keys": listed.iter().map(|(k, r)| key_json(k, r, ctx.now_ms)).collect::<Vec<_>>(),
    });
    Ok(Done::ok(text, json))
}

/// Columns padded to their widest cell (the last one not padded).
pub fn table<const N: usize>(head: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = head.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(head.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn show(ctx: &Ctx, keys: &Keys, key: &[u8]) -> Result<Done, CliError> {
    let Some(record) = keys.record(key, ctx.now_ms)? else {
        let text = format!("{}: no record (a call would run now)\n", key_text(key));
        let json = json!({ "key": key_text(key), "key_hex": hex(key), "state": "absent" });
        return Ok(Done::ok(text, json));
    };
    let now = ctx.now_ms;
    let mut text = String::new();
    let _ = writeln!(text, "key:          {}", key_text(key));
    match record.state {
        KeyState::Claimed { lease_until_ms, .. } => {
            let _ = writeln!(text, "state:        claimed");
            let _ = writeln!(text, "token:        {}", token_of(&record));
            let _ = writeln!(
                text,
                "fingerprint:  {}",
                hex(shown_fingerprint(&record.fingerprint))
            );
            let _ = writeln!(text, "owner:        {OWNER_UNKNOWN}");
            let _ = writeln!(
                text,
                "lease left:   {} (until {})",
                left_text(&record, now),
                utc(lease_until_ms)
            );
        }
        KeyState::Completed {
            result,
            expires_at_ms,
            ..
        } => {
            let _ = writeln!(text, "state:        completed (result {result})");
            let _ = writeln!(text, "token:        {}", token_of(&record));
            let _ = writeln!(
                text,
                "fingerprint:  {}",
                hex(shown_fingerprint(&record.fingerprint))
            );
            let _ = writeln!(text, "owner:        -");
            let _ = writeln!(
                text,
                "expiry:       {} ({})",
                utc(expires_at_ms),
                left_text(&record, now)
            );
        }
    }
    Ok(Done::ok(text, key_json(key, &record, now)))
}

/// What a call for `key` would do now, and why, in words.
fn explain(
    ctx: &Ctx,
    key: &[u8],
    record: Option<&KeyRecord>,
    fingerprint: Option<&[u8]>,
) -> (bool, String) {
    let now = ctx.now_ms;
    let shown = key_text(key);
    let Some(record) = record else {
        return (
            true,
            format!(
                "A call for {shown} would run now: the store has no record of it (never claimed, \
                 released, forgotten, or expired and dropped)."
            ),
        );
    };
    let token = token_of(record);
    let other_payload = fingerprint.map(|fp| {
        !Fingerprint::try_from(fp).is_ok_and(|fp| same_fingerprint(&record.fingerprint, &fp))
    });
    let payload = match other_payload {
        Some(true) => " The fingerprint you gave differs from the key's.",
        Some(false) => " The fingerprint you gave is the key's.",
        None => "",
    };
    match record.state {
        KeyState::Claimed { lease_until_ms, .. } if lease_until_ms > now => {
            let outcome = match other_payload {
                Some(true) => "is refused as a conflict (the key is claimed with another fingerprint)".to_string(),
                Some(false) => "returns IN_PROGRESS (the same payload is already running)".to_string(),
                None => "returns IN_PROGRESS with the same payload, and is refused as a conflict with another".to_string(),
            };
            (
                false,
                format!(
                    "A call for {shown} would not run now: it is claimed by token {token}, lease left {} \
                     (until {}); {OWNER_UNKNOWN}. A call now {outcome}.{payload} The claim is taken over \
                     once its lease runs out unless its owner renews it; if the owner is known dead: \
                     keys release {shown} --if-token {token}.",
                    span(lease_until_ms - now),
                    utc(lease_until_ms),
                ),
            )
        }
        KeyState::Claimed { lease_until_ms, .. } => (
            true,
            format!(
                "A call for {shown} would run now: its claim by token {token} expired {} ago (the lease \
                 ran out at {}; its owner is presumed dead, {OWNER_UNKNOWN}); the call takes it over with \
                 a higher token, so the old owner's fenced writes are refused.{payload}",
                span(now - lease_until_ms),
                utc(lease_until_ms),
            ),
        ),
        KeyState::Completed {
            result,
            expires_at_ms,
            ..
        } if expires_at_ms > now => {
            let outcome = match other_payload {
                Some(true) => format!(
                    "is refused as a conflict: the key was completed with another fingerprint ({})",
                    hex(shown_fingerprint(&record.fingerprint))
                ),
                Some(false) => format!("replays result {result} without running"),
                None => format!(
                    "replays result {result} without running if it carries the same payload \
                     (fingerprint {}), and is refused as a conflict if it carries another",
                    hex(shown_fingerprint(&record.fingerprint))
                ),
            };
            (
                false,
                format!(
                    "A call for {shown} would not run now: it was completed by token {token} with result \
                     {result}, kept until {} ({} left). A call now {outcome}.{payload} To let it run \
                     again: keys forget {shown} --reason TEXT.",
                    utc(expires_at_ms),
                    span(expires_at_ms - now),
                ),
            )
        }
        KeyState::Completed { expires_at_ms, .. } => (
            true,
            format!(
                "A call for {shown} would run now: its completion by token {token} expired {} ago (at {}).",
                span(now - expires_at_ms),
                utc(expires_at_ms),
            ),
        ),
    }
}

fn why(ctx: &Ctx, keys: &Keys, key: &[u8], fingerprint: Option<&str>) -> Result<Done, CliError> {
    let fingerprint = fingerprint
        .map(|hex_text| {
            backup_coordinator_core::hex::unhex(hex_text.trim())
                .filter(|fp| fp.len() == 32)
                .ok_or_else(|| {
                    CliError(format!(
                        "--fingerprint {hex_text:?} is not 64 hex digits (a SHA-256)"
                    ))
                })
        })
        .transpose()?;
    let record = keys.record(key, ctx.now_ms)?;
    let (runs, text) = explain(ctx, key, record.as_ref(), fingerprint.as_deref());
    let mut json = match &record {
        Some(record) => key_json(key, record, ctx.now_ms),
        None => json!({ "key": key_text(key), "key_hex": hex(key), "state": "absent" }),
    };
    json["runs_now"] = Value::Bool(runs);
    json["why"] = Value::String(text.clone());
    Ok(Done::ok(text + "\n", json))
}

fn release(
    ctx: &Ctx,
    keys: &Keys,
    key: &[u8],
    if_token: u64,
    reason: &str,
) -> Result<Done, CliError> {
    let shown = key_text(key);
    let record = keys.record(key, ctx.now_ms)?;
    let refuse = |why: String| {
        let json = json!({ "key": shown, "released": false, "token": if_token, "reason": why });
        Ok(Done::refused(String::new(), json, why))
    };
    let lease_until_ms = match record.map(|r| r.state) {
        None => return refuse("not released: the key has no claim".to_string()),
        Some(KeyState::Completed { token, .. }) => {
            return refuse(format!(
                "not released: the key is completed (token {}), not claimed (keys forget lets it run again)",
                token.0
            ))
        }
        Some(KeyState::Claimed { token, .. }) if token.0 != if_token => {
            return refuse(format!(
                "not released: the key's claim has token {}",
                token.0
            ))
        }
        Some(KeyState::Claimed { lease_until_ms, .. }) => lease_until_ms,
    };
    let store = keys.store().expect("a record was read from the store");
    // Acts only on the claim with this token, whatever happened since it was read.
    store.release(key, ClaimToken(if_token))?;
    if let Some(KeyRecord {
        state: KeyState::Claimed { token, .. },
        ..
    }) = keys.record(key, ctx.now_ms)?
    {
        if token.0 == if_token {
            return Err(CliError(format!(
                "the claim of {shown} with token {if_token} is still there after the release"
            )));
        }
    }
    let left = lease_until_ms.saturating_sub(ctx.now_ms);
    let what = format!(
        "released the claim of {shown} with token {if_token} (lease left {}); the next claim's token is higher, so its owner's fenced writes are refused",
        span(left)
    );
    super::note_change(ctx, &what, reason);
    let json = json!({
        "key": shown,
        "key_hex": hex(key),
        "released": true,
        "token": if_token,
        "lease_left_ms": left,
        "reason": reason,
    });
    Ok(Done::ok(what + "\n", json))
}

fn forget(ctx: &Ctx, keys: &Keys, key: &[u8], reason: &str) -> Result<Done, CliError> {
    let shown = key_text(key);
    let Some(store) = keys.store() else {
        let why = "not forgotten: the key has no record".to_string();
        let json = json!({ "key": shown, "forgotten": false, "reason": why });
        return Ok(Done::refused(String::new(), json, why));
    };
    let before = keys.record(key, ctx.now_ms)?;
    match store.forget(key, ctx.now_ms)? {
        Forgotten::Removed => {
            let what = match before.map(|r| r.state) {
                Some(KeyState::Completed { token, result, .. }) => format!(
                    "forgot {shown} (completed by token {} with result {result}): a call may run it again",
                    token.0
                ),
                _ => format!("forgot {shown}: a call may run it again"),
            };
            super::note_change(ctx, &what, reason);
            let json =
                json!({ "key": shown, "key_hex": hex(key), "forgotten": true, "reason": reason });
            Ok(Done::ok(what + "\n", json))
        }
        Forgotten::Absent => {
            let why = "not forgotten: the key has no record".to_string();
            let json = json!({ "key": shown, "forgotten": false, "reason": why });
            Ok(Done::refused(String::new(), json, why))
        }
        Forgotten::InProgress => {
            let token = before.map_or(0, |r| token_of(&r));
            let why = format!(
                "not forgotten: the key is claimed (token {token}) and its owner may be running it; \
                 if the owner is known dead, keys release {shown} --if-token {token} first"
            );
            let json = json!({ "key": shown, "forgotten": false, "token": token, "reason": why });
            Ok(Done::refused(String::new(), json, why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backup_coordinator_core::config::PluginConfig;

    fn ctx(now_ms: u64) -> Ctx {
        Ctx {
            config: PluginConfig::default(),
            now_ms,
            json: false,
        }
    }

    fn claimed(lease_until_ms: u64) -> KeyRecord {
        KeyRecord {
            fingerprint: [0xab; 32],
            state: KeyState::Claimed {
                token: ClaimToken(77),
                lease_until_ms,
            },
        }
    }

    #[test]
    fn why_says_what_a_call_would_do_in_words() {
        let ctx = ctx(1_000_000);
        let (runs, text) = explain(&ctx, b"job", Some(&claimed(1_041_000)), None);
        assert!(!runs);
        assert!(
            text.contains("claimed by token 77, lease left 41 s"),
            "{text}"
        );
        assert!(text.contains("owner unknown"), "{text}");
        let (runs, text) = explain(&ctx, b"job", Some(&claimed(990_000)), None);
        assert!(runs && text.contains("expired 10 s ago"), "{text}");
        let done = KeyRecord {
            fingerprint: [1; 32],
            state: KeyState::Completed {
                token: ClaimToken(5),
                result: 0,
                expires_at_ms: 2_000_000,
            },
        };
        let (runs, text) = explain(&ctx, b"job", Some(&done), Some(&[2; 32]));
        assert!(!runs);
        assert!(
            text.contains("completed with another fingerprint"),
            "{text}"
        );
        let (runs, text) = explain(&ctx, b"job", None, None);
        assert!(runs && text.contains("no record"), "{text}");
    }

    #[test]
    fn tables_pad_their_columns() {
        let rows = [["a".to_string(), "bb".to_string()]];
        assert_eq!(table(["K", "V"], &rows), "K  V\na  bb\n");
    }

    #[test]
    fn older_than_counts_from_the_claim_or_the_completion() {
        // Lease until now + 30 s of a 90 s lease: renewed 60 s ago.
        assert_eq!(age_ms(10_000_000, 90_000, 0, &claimed(10_030_000)), 60_000);
    }
}
