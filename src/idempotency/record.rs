//! One line of the idempotency journal: the new state of one key.
//!
//! `<crc32 of the rest, 8 hex> <kind> <token> <time> <result> <fingerprint> <key hex>\n`
//!
//! kind `C`: claimed by the claim `token` until `time` (its lease); `D`: completed with `result`,
//! replayed until `time`; `X`: the key is gone (released or forgotten). Lines are text so
//! that an operator can read the journal; the key is hex so any byte content is safe.

use super::{ClaimToken, Fingerprint, KeyRecord, KeyState, MAX_KEY_BYTES};
use crate::hex::{hex, unhex};
use std::fmt::Write as _;

/// The longest line a record can take: reserved for each claim's completion.
pub(crate) const MAX_RECORD_BYTES: usize =
    8 + 1 + 1 + 1 + 16 + 1 + 20 + 1 + 11 + 1 + 64 + 1 + 2 * MAX_KEY_BYTES + 1;

/// A journal entry: a key and its state after the entry (`None`: the key is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub state: Option<KeyRecord>,
}

/// Appends the line of `key` becoming `state` to `out`.
pub fn encode(out: &mut Vec<u8>, key: &[u8], state: Option<&KeyRecord>) {
    let mut body = String::with_capacity(128 + 2 * key.len());
    let (kind, token, time, result) = match state.map(|r| &r.state) {
        Some(KeyState::Claimed {
            token,
            lease_until_ms,
        }) => ('C', token.0, *lease_until_ms, 0),
        Some(KeyState::Completed {
            result,
            expires_at_ms,
        }) => ('D', 0, *expires_at_ms, *result),
        None => ('X', 0, 0, 0),
    };
    let _ = write!(body, "{kind} {token:016x} {time} {result} ");
    body.push_str(&hex(&state.map_or([0; 32], |r| r.fingerprint)));
    body.push(' ');
    body.push_str(&hex(key));
    let crc = crc32fast::hash(body.as_bytes());
    out.extend_from_slice(format!("{crc:08x} ").as_bytes());
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
}

/// Parses one line (without its newline); `None` when it does not check.
pub fn decode(line: &[u8]) -> Option<Entry> {
    let line = std::str::from_utf8(line).ok()?;
    let (crc, body) = line.split_once(' ')?;
    if crc.len() != 8 || u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
        return None;
    }
    let mut fields = body.split(' ');
    let kind = fields.next()?;
    let token = ClaimToken(u64::from_str_radix(fields.next()?, 16).ok()?);
    let time: u64 = fields.next()?.parse().ok()?;
    let result: i32 = fields.next()?.parse().ok()?;
    let fingerprint: Fingerprint = unhex(fields.next()?)?.try_into().ok()?;
    let key = unhex(fields.next()?)?;
    if fields.next().is_some() || key.is_empty() || key.len() > MAX_KEY_BYTES {
        return None;
    }
    let state = match kind {
        "C" => Some(KeyState::Claimed {
            token,
            lease_until_ms: time,
        }),
        "D" => Some(KeyState::Completed {
            result,
            expires_at_ms: time,
        }),
        "X" => None,
        _ => return None,
    };
    Some(Entry {
        key,
        state: state.map(|state| KeyRecord { fingerprint, state }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(key: &[u8], state: Option<KeyRecord>) {
        let mut line = Vec::new();
        encode(&mut line, key, state.as_ref());
        assert_eq!(line.last(), Some(&b'\n'));
        assert!(line.len() <= MAX_RECORD_BYTES, "{} bytes", line.len());
        let entry = decode(&line[..line.len() - 1]).expect("decodes");
        assert_eq!(
            entry,
            Entry {
                key: key.to_vec(),
                state
            }
        );
    }

    #[test]
    fn every_kind_roundtrips_and_fits_the_reserved_size() {
        let fp = [0xab; 32];
        roundtrip(b"k", None);
        roundtrip(
            &[0xff; MAX_KEY_BYTES],
            Some(KeyRecord {
                fingerprint: fp,
                state: KeyState::Claimed {
                    token: ClaimToken(u64::MAX),
                    lease_until_ms: u64::MAX,
                },
            }),
        );
        roundtrip(
            b"a key\n with \0 bytes",
            Some(KeyRecord {
                fingerprint: fp,
                state: KeyState::Completed {
                    result: i32::MIN,
                    expires_at_ms: u64::MAX,
                },
            }),
        );
    }

    #[test]
    fn a_flipped_byte_or_a_cut_line_does_not_check() {
        let mut line = Vec::new();
        encode(&mut line, b"key", None);
        line.pop();
        for i in 0..line.len() {
            let mut bad = line.clone();
            bad[i] ^= 0x01;
            assert_eq!(decode(&bad), None, "flip at {i}");
        }
        for cut in 0..line.len() {
            assert_eq!(decode(&line[..cut]), None, "cut at {cut}");
        }
    }
}
