//! How the command line shows keys, records, times and durations (docs/C_API.md §11).

use backup_coordinator_core::hex::hex;
use backup_coordinator_core::idempotency::{shown_fingerprint, KeyRecord, KeyState};
use serde_json::{json, Value};

/// A key as typed on a command line: printable ASCII as it is, other bytes escaped.
pub fn key_text(key: &[u8]) -> String {
    key.iter()
        .flat_map(|b| b.escape_ascii())
        .map(char::from)
        .collect()
}

/// A unix time in ms as UTC, "2026-12-05T08:06:24Z".
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let day = secs % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        backup_coordinator_core::diagnostics::utc_date(secs),
        day / 3600,
        day % 3600 / 60,
        day % 60
    )
}

/// A span of ms as a person reads it: "41 s", "12 min", "23 h", "6 d".
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7_199 => format!("{} min", s / 60),
        7_200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

pub fn state_name(record: &KeyRecord) -> &'static str {
    match record.state {
        KeyState::Claimed { .. } => "claimed",
        KeyState::Completed { .. } => "completed",
    }
}

pub fn token_of(record: &KeyRecord) -> u64 {
    match record.state {
        KeyState::Claimed { token, .. } | KeyState::Completed { token, .. } => token.0,
    }
}

/// The JSON of one key (docs/C_API.md §11): the same fields for every command.
pub fn key_json(key: &[u8], record: &KeyRecord, now_ms: u64) -> Value {
    let mut value = json!({
        "key": key_text(key),
        "key_hex": hex(key),
        "state": state_name(record),
        "live": record.is_live(now_ms),
        "token": token_of(record),
        "fingerprint": hex(shown_fingerprint(&record.fingerprint)),
        "owner": Value::Null,
        "lease_until_ms": Value::Null,
        "lease_left_ms": Value::Null,
        "result": Value::Null,
        "expires_at_ms": Value::Null,
        "expires_in_ms": Value::Null,
    });
    match record.state {
        KeyState::Claimed { lease_until_ms, .. } => {
            value["lease_until_ms"] = json!(lease_until_ms);
            value["lease_left_ms"] = json!(lease_until_ms.saturating_sub(now_ms));
        }
        KeyState::Completed {
            result,
            expires_at_ms,
            ..
        } => {
            value["result"] = json!(result);
            value["expires_at_ms"] = json!(expires_at_ms);
            value["expires_in_ms"] = json!(expires_at_ms.saturating_sub(now_ms));
        }
    }
    value
}

/// "lease left 41 s" / "replays result 0 for 23 h", for a line of `keys list`.
pub fn left_text(record: &KeyRecord, now_ms: u64) -> String {
    match record.state {
        KeyState::Claimed { lease_until_ms, .. } if lease_until_ms > now_ms => {
            format!("lease left {}", span(lease_until_ms - now_ms))
        }
        KeyState::Claimed { lease_until_ms, .. } => {
            format!("lease ran out {} ago", span(now_ms - lease_until_ms))
        }
        KeyState::Completed { expires_at_ms, .. } if expires_at_ms > now_ms => {
            format!("expires in {}", span(expires_at_ms - now_ms))
        }
        KeyState::Completed { expires_at_ms, .. } => {
            format!("expired {} ago", span(now_ms - expires_at_ms))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_spans_read_as_a_person_reads_them() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_764_921_984_000), "2025-12-05T08:06:24Z");
        assert_eq!(span(41_999), "41 s");
        assert_eq!(span(600_000), "10 min");
        assert_eq!(span(86_400_000), "24 h");
        assert_eq!(span(7 * 86_400_000), "7 d");
        assert_eq!(key_text(b"job\n1"), "job\\n1");
    }
}
