//! `keys list` and `records list` on etcd (docs/C_API.md §11, §9): paged range reads of
//! `<prefix>k/` (each key unescaped), then of `<prefix>i/`, where earlier builds kept them
//! (each key decoded back from base64url), each claim's lease left asked of etcd; and of
//! `<prefix>log/` (`<hex task>/<hex command>`, as the records store names them).

use backup_coordinator_core::error::Result;
use backup_coordinator_core::etcd::EtcdBackend;
use backup_coordinator_core::idempotency::{KeyRecord, KeyState};
use backup_coordinator_core::log_backup::records::Sequence;
use etcd_client::{GetOptions, KeyValue};

/// The key an etcd name stands for, if it names one.
type NameOf = fn(&[u8]) -> Option<Vec<u8>>;

/// Keys read per request.
const PAGE: i64 = 1000;

/// The live keys that `keep` keeps, sorted by key.
pub fn list(
    etcd: &EtcdBackend,
    now_ms: u64,
    keep: impl Fn(&[u8], &KeyRecord) -> bool + Send + 'static,
) -> Result<Vec<(Vec<u8>, KeyRecord)>> {
    etcd.client().run(move |conn| async move {
        let [(current, current_end), (old, old_end)] =
            backup_coordinator_core::etcd::idempotency::key_spaces(&conn);
        let spaces: [(_, _, NameOf); 2] = [
            (
                current,
                current_end,
                backup_coordinator_core::etcd::idempotency::unescape_key,
            ),
            (old, old_end, unbase64url),
        ];
        let mut listed: Vec<(Vec<u8>, KeyRecord)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (prefix, end, name_of) in spaces {
            let mut from = prefix.clone();
            loop {
                let page = conn
                    .request("list idempotency keys", |mut client| {
                        let (from, end) = (from.clone(), end.clone());
                        async move {
                            let options = GetOptions::new().with_range(end).with_limit(PAGE);
                            Ok(client.get(from, Some(options)).await?.take_kvs())
                        }
                    })
                    .await?;
                let more = page.len() as i64 == PAGE;
                for kv in &page {
                    let Some(key) = name_of(&kv.key()[prefix.len()..]) else {
                        continue;
                    };
                    // A key in both spaces is this layout's (a claim deletes the other).
                    if !seen.insert(key.clone()) {
                        continue;
                    }
                    let mut record = backup_coordinator_core::etcd::idempotency::record_of(kv)?;
                    match &mut record.state {
                        KeyState::Claimed { lease_until_ms, .. } => {
                            match conn
                                .time_to_live("read a claim's lease", kv.lease())
                                .await?
                            {
                                Some(seconds) => *lease_until_ms = now_ms + seconds * 1000,
                                None => continue,
                            }
                        }
                        KeyState::Completed { expires_at_ms, .. } if *expires_at_ms <= now_ms => {
                            continue
                        }
                        KeyState::Completed { .. } => {}
                    }
                    if keep(&key, &record) {
                        listed.push((key, record));
                    }
                }
                match page.last() {
                    Some(last) if more => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
        }
        Ok(listed)
    })
}

/// Every key-value under `<prefix><space>/`, read `PAGE` at a time.
async fn range(
    conn: &backup_coordinator_core::etcd::client::Conn,
    space: &str,
) -> Result<(usize, Vec<KeyValue>)> {
    let prefix = conn.key(space, &[]);
    let mut start = prefix.clone();
    start.push(b'/');
    // The end of the range: the prefix then '0', which follows '/'.
    let mut end = prefix;
    end.push(b'0');
    let skip = start.len();
    let mut from = start;
    let mut all = Vec::new();
    loop {
        let page = conn
            .request("list the store", |mut client| {
                let (from, end) = (from.clone(), end.clone());
                async move {
                    let options = GetOptions::new().with_range(end).with_limit(PAGE);
                    Ok(client.get(from, Some(options)).await?.take_kvs())
                }
            })
            .await?;
        let more = page.len() as i64 == PAGE;
        if let (true, Some(last)) = (more, page.last()) {
            from = last.key().to_vec();
            from.push(0);
        }
        all.extend(page);
        if !more {
            return Ok((skip, all));
        }
    }
}

/// One (task, command) with retry records on etcd, or why its value does not parse.
pub type EtcdRecords = (String, String, Result<Sequence, String>);

/// Every (task, command) with retry records, by etcd key.
pub fn list_records(etcd: &EtcdBackend) -> Result<Vec<EtcdRecords>> {
    etcd.client().run(move |conn| async move {
        let (skip, kvs) = range(&conn, "log").await?;
        let mut listed = Vec::new();
        for kv in &kvs {
            let name = &kv.key()[skip..];
            let mut parts = name.split(|&b| b == b'/');
            let (Some(task), Some(command), None) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let unhex = |part: &[u8]| {
                std::str::from_utf8(part)
                    .ok()
                    .and_then(backup_coordinator_core::hex::unhex)
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            };
            let (Some(task), Some(command)) = (unhex(task), unhex(command)) else {
                continue;
            };
            let sequence = backup_coordinator_core::etcd::log_records::decode(kv.value())
                .ok_or_else(|| {
                    format!(
                        "etcd key {}: the retry records do not parse",
                        String::from_utf8_lossy(kv.key())
                    )
                });
            listed.push((task, command, sequence));
        }
        Ok(listed)
    })
}

/// Unpadded base64url (RFC 4648 §5), as `Conn::key64` writes keys.
pub fn unbase64url(text: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    };
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_decodes_rfc_4648_vectors_unpadded() {
        for (raw, encoded) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(unbase64url(encoded.as_bytes()).unwrap(), raw.as_bytes());
        }
        assert_eq!(unbase64url(b"-_8").unwrap(), [0xfb, 0xff]);
        assert_eq!(unbase64url(b"Zm9v!"), None);
        assert_eq!(unbase64url(b"Z"), None);
    }
}
