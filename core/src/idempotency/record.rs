//! One record of the idempotency journal: the new state of one key, in a compact binary form.
//!
//! `kind | key length | fields | key | crc32 of all before it`, little-endian; kind 0xC1:
//! claimed by the claim `token` (u64) until `time` (u64, its lease), then the fingerprint
//! (32 bytes); 0xD2: completed by the claim `token` (u64) with `result` (i32), replayed
//! until `time` (u64), then the fingerprint; 0xD1 (written by earlier builds, still read):
//! the same without the token; 0xE1: the key is gone (released or forgotten), no fields.
//! The kind bytes are rare in text and counts, which lets a reader find the next record
//! after a bad one. A completed 32-byte key takes 90 bytes (the text lines of earlier
//! versions took about 180).

use super::{ClaimToken, Fingerprint, KeyRecord, KeyState, MAX_KEY_BYTES};

const CLAIMED: u8 = 0xC1;
/// A completion of an earlier build: no token.
const COMPLETED_V1: u8 = 0xD1;
const COMPLETED: u8 = 0xD2;
const GONE: u8 = 0xE1;
const HEAD: usize = 2;
const CRC: usize = 4;

/// The longest record (a completion): reserved for each claim's completion.
pub(crate) const MAX_RECORD_BYTES: usize = HEAD + 8 + 4 + 8 + 32 + MAX_KEY_BYTES + CRC;

/// A journal entry: a key and its state after the entry (`None`: the key is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub state: Option<KeyRecord>,
}

fn fields_len(kind: u8) -> Option<usize> {
    match kind {
        CLAIMED => Some(8 + 8 + 32),
        COMPLETED => Some(8 + 4 + 8 + 32),
        COMPLETED_V1 => Some(4 + 8 + 32),
        GONE => Some(0),
        _ => None,
    }
}

/// Appends the record of `key` becoming `state` to `out`.
pub fn encode(out: &mut Vec<u8>, key: &[u8], state: Option<&KeyRecord>) {
    debug_assert!(!key.is_empty() && key.len() <= MAX_KEY_BYTES);
    let start = out.len();
    let kind = match state.map(|r| &r.state) {
        Some(KeyState::Claimed { .. }) => CLAIMED,
        Some(KeyState::Completed { .. }) => COMPLETED,
        None => GONE,
    };
    out.extend_from_slice(&[kind, key.len() as u8]);
    if let Some(record) = state {
        match record.state {
            KeyState::Claimed {
                token,
                lease_until_ms,
            } => {
                out.extend_from_slice(&token.0.to_le_bytes());
                out.extend_from_slice(&lease_until_ms.to_le_bytes());
            }
            KeyState::Completed {
                token,
                result,
                expires_at_ms,
            } => {
                out.extend_from_slice(&token.0.to_le_bytes());
                out.extend_from_slice(&result.to_le_bytes());
                out.extend_from_slice(&expires_at_ms.to_le_bytes());
            }
        }
        out.extend_from_slice(&record.fingerprint);
    }
    out.extend_from_slice(key);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The length of the record of a `key_len`-byte key, a claim or a completion (at most: a
/// completion of an earlier build is shorter, and its head says so).
pub fn len_of(claim: bool, key_len: usize) -> usize {
    let kind = if claim { CLAIMED } else { COMPLETED };
    HEAD + fields_len(kind).unwrap_or(0) + key_len + CRC
}

/// Whether `byte` may start a record.
pub fn is_kind(byte: u8) -> bool {
    fields_len(byte).is_some()
}

/// The length of the record starting `bytes`, as its head says (`None`: not a record head).
pub fn record_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < HEAD || bytes[1] == 0 {
        return None;
    }
    Some(HEAD + fields_len(bytes[0])? + bytes[1] as usize + CRC)
}

/// Decodes the record at the start of `bytes` and its length; `None` when it does not check
/// (or is cut short).
pub fn decode(bytes: &[u8]) -> Option<(Entry, usize)> {
    let len = record_len(bytes)?;
    let record = bytes.get(..len)?;
    let (body, crc) = record.split_at(len - CRC);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let (kind, key_len) = (body[0], body[1] as usize);
    let fields = &body[HEAD..body.len() - key_len];
    let u64_at = |at: usize| u64::from_le_bytes(fields[at..at + 8].try_into().unwrap());
    let fp = |at: usize| -> Fingerprint { fields[at..at + 32].try_into().unwrap() };
    let state = match kind {
        CLAIMED => Some(KeyRecord {
            state: KeyState::Claimed {
                token: ClaimToken(u64_at(0)),
                lease_until_ms: u64_at(8),
            },
            fingerprint: fp(16),
        }),
        COMPLETED => Some(KeyRecord {
            state: KeyState::Completed {
                token: ClaimToken(u64_at(0)),
                result: i32::from_le_bytes(fields[8..12].try_into().unwrap()),
                expires_at_ms: u64_at(12),
            },
            fingerprint: fp(20),
        }),
        COMPLETED_V1 => Some(KeyRecord {
            state: KeyState::Completed {
                token: ClaimToken(0),
                result: i32::from_le_bytes(fields[..4].try_into().unwrap()),
                expires_at_ms: u64_at(4),
            },
            fingerprint: fp(12),
        }),
        _ => None,
    };
    let key = body[body.len() - key_len..].to_vec();
    Some((Entry { key, state }, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(key: &[u8], state: Option<KeyRecord>) {
        let mut bytes = vec![0xee];
        encode(&mut bytes, key, state.as_ref());
        let record = &bytes[1..];
        assert!(record.len() <= MAX_RECORD_BYTES, "{} bytes", record.len());
        assert_eq!(record_len(record), Some(record.len()));
        let (entry, len) = decode(record).expect("decodes");
        assert_eq!(len, record.len());
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
                    token: ClaimToken(u64::MAX),
                    result: i32::MIN,
                    expires_at_ms: u64::MAX,
                },
            }),
        );
    }

    #[test]
    fn a_completed_32_byte_key_takes_90_bytes() {
        let mut bytes = Vec::new();
        let done = KeyRecord {
            fingerprint: [1; 32],
            state: KeyState::Completed {
                token: ClaimToken(7),
                result: 0,
                expires_at_ms: 1,
            },
        };
        encode(&mut bytes, &[b'k'; 32], Some(&done));
        assert_eq!(bytes.len(), 90);
        assert_eq!(len_of(false, 32), 90);
    }

    #[test]
    fn a_completion_of_an_earlier_build_is_read_with_no_token() {
        // 0xD1: result, expiry, fingerprint, key, as earlier builds wrote it.
        let mut old = vec![COMPLETED_V1, 1];
        old.extend_from_slice(&(-6i32).to_le_bytes());
        old.extend_from_slice(&99u64.to_le_bytes());
        old.extend_from_slice(&[4; 32]);
        old.push(b'k');
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(old.len(), 82 - 31);
        // Read from a buffer as long as a new completion, as the journal reads it.
        let mut buf = old.clone();
        buf.resize(len_of(false, 1), 0);
        let (entry, len) = decode(&buf).expect("decodes");
        assert_eq!(len, old.len());
        assert_eq!(
            entry.state,
            Some(KeyRecord {
                fingerprint: [4; 32],
                state: KeyState::Completed {
                    token: ClaimToken(0),
                    result: -6,
                    expires_at_ms: 99
                }
            })
        );
    }

    #[test]
    fn a_flipped_bit_or_a_cut_record_does_not_check() {
        let mut record = Vec::new();
        let claimed = KeyRecord {
            fingerprint: [3; 32],
            state: KeyState::Claimed {
                token: ClaimToken(5),
                lease_until_ms: 6,
            },
        };
        encode(&mut record, b"key", Some(&claimed));
        for i in 0..record.len() {
            for bit in 0..8 {
                let mut bad = record.clone();
                bad[i] ^= 1 << bit;
                assert_eq!(decode(&bad), None, "flip at {i}");
            }
        }
        for cut in 0..record.len() {
            assert_eq!(decode(&record[..cut]), None, "cut at {cut}");
        }
    }
}
