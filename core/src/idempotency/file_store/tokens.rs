//! The file store's fencing tokens (docs/C_API.md §8.1): every claim of a key gets a token
//! strictly greater than every earlier claim's, whatever happened between (takeover,
//! release, expiry, forget, restart, compaction, another process), never 0; and also when
//! `state_dir` is wiped and recreated, as long as the wall clock does not step back.
//!
//! `tokens` beside the journal holds two counters, each in a slot of its own (value, CRC):
//! - `issued`, the last token any process issued, rewritten by each claim under the
//!   journal's lock, before its record is appended. No fsync: the processes of a host share
//!   the page cache, and only a power loss can take it back.
//! - `floor`, fsynced, raised to at least `issued` by the maintainer before it renames a
//!   compacted journal or an index image into place: every token of a record that a
//!   restart will not read again (dropped by compaction, or covered by an image) is below
//!   it. After a power loss, the tokens of the journal past its image are read again at
//!   open ([`Tokens::note`]): whatever `issued` lost is found there (a claim whose record
//!   did not reach the disk never ran its operation: its token fences nothing).
//!
//! A token is at least the wall clock in microseconds, so a store started afresh (its
//! directory wiped) still issues tokens above those of the store it replaces: the store
//! issues far fewer than one claim per microsecond, so its tokens never run ahead of the
//! clock for long.

use super::files::open_rw;
use crate::durable::FileError;
use crate::error::{Error, Result};
use crate::idempotency::record::Entry;
use crate::idempotency::{ClaimToken, KeyState};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

const ISSUED_AT: u64 = 0;
const FLOOR_AT: u64 = 16;
/// A slot: the value (u64) and the CRC-32 of its 8 bytes, little-endian.
const SLOT: usize = 12;

pub(super) struct Tokens {
    file: File,
    path: PathBuf,
    /// The highest token this process has issued or read in a record.
    seen: AtomicU64,
}

impl Tokens {
    pub(super) fn open(path: PathBuf) -> Result<Tokens> {
        let file = open_rw(&path)?;
        let tokens = Tokens {
            file,
            path,
            seen: AtomicU64::new(0),
        };
        // A floor that does not check is corruption, reported at once.
        let floor = tokens.read(FLOOR_AT)?;
        tokens.seen.fetch_max(floor, Ordering::Relaxed);
        Ok(tokens)
    }

    /// Notes the token of a record read from the journal.
    pub(super) fn note(&self, entry: &Entry) {
        let token = match entry.state.map(|r| r.state) {
            Some(KeyState::Claimed { token, .. }) | Some(KeyState::Completed { token, .. }) => {
                token.0
            }
            None => return,
        };
        self.seen.fetch_max(token, Ordering::Relaxed);
    }

    /// The next token, for a claim made at `now_ms`. Called under the journal's lock.
    pub(super) fn issue(&self, now_ms: u64) -> Result<ClaimToken> {
        let issued = self.read(ISSUED_AT)?;
        let seen = self.seen.load(Ordering::Relaxed);
        let token = issued
            .max(seen)
            .saturating_add(1)
            .max(now_ms.saturating_mul(1000));
        self.write(ISSUED_AT, token)?;
        self.seen.fetch_max(token, Ordering::Relaxed);
        Ok(ClaimToken(token))
    }

    /// Raises the durable floor above every token issued so far. Called by the maintainer
    /// (one at a time across processes) before a compacted journal or an image is renamed
    /// into place.
    pub(super) fn raise_floor(&self) -> Result<()> {
        let floor = self.read(FLOOR_AT)?;
        let high = self.read(ISSUED_AT)?.max(self.seen.load(Ordering::Relaxed));
        if high > floor {
            self.write(FLOOR_AT, high)?;
            self.file
                .sync_data()
                .map_err(|e| FileError::new("fsync", &self.path, e))?;
        }
        Ok(())
    }

    /// Both counters, (last issued, durable floor), each checked (for `store verify`,
    /// docs/C_API.md §11).
    pub(super) fn counters(&self) -> Result<(u64, u64)> {
        Ok((self.read(ISSUED_AT)?, self.read(FLOOR_AT)?))
    }

    /// The counter in the slot at `at`; 0 when the slot was never written.
    fn read(&self, at: u64) -> Result<u64> {
        let mut slot = [0u8; SLOT];
        let n = read_full(&self.file, &mut slot, at)
            .map_err(|e| FileError::new("read", &self.path, e))?;
        if n == 0 || slot == [0; SLOT] {
            return Ok(0);
        }
        let (value, crc) = slot.split_at(8);
        if n < SLOT || crc32fast::hash(value).to_le_bytes() != crc {
            return Err(Error::Corruption(format!(
                "{}: the token counter at byte {at} does not check (remove the file only if \
                 no process uses the store: tokens then restart from the clock)",
                self.path.display()
            )));
        }
        Ok(u64::from_le_bytes(value.try_into().expect("8 bytes")))
    }

    fn write(&self, at: u64, value: u64) -> Result<()> {
        let mut slot = [0u8; SLOT];
        slot[..8].copy_from_slice(&value.to_le_bytes());
        let crc = crc32fast::hash(&slot[..8]);
        slot[8..].copy_from_slice(&crc.to_le_bytes());
        self.file
            .write_all_at(&slot, at)
            .map_err(|e| FileError::new("write", &self.path, e).into())
    }
}

fn read_full(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(read) => n += read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::path::Path;

    fn open(dir: &Path) -> Tokens {
        Tokens::open(dir.join("tokens")).unwrap()
    }

    #[test]
    fn tokens_increase_across_handles_and_are_at_least_the_clock_in_microseconds() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open(dir.path()), open(dir.path()));
        let first = a.issue(5).unwrap();
        assert_eq!(first, ClaimToken(5000));
        // Another handle (another process) continues from what the first issued.
        assert_eq!(b.issue(5).unwrap(), ClaimToken(5001));
        assert_eq!(a.issue(5).unwrap(), ClaimToken(5002));
        // The clock stepped back: still increasing.
        assert_eq!(a.issue(1).unwrap(), ClaimToken(5003));
        // The clock moved on: tokens follow it.
        assert_eq!(b.issue(9).unwrap(), ClaimToken(9000));
        assert!(a.issue(0).unwrap().0 > 0);
    }

    #[test]
    fn a_lost_issued_counter_is_made_up_by_the_floor_and_the_records_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path());
        for _ in 0..10 {
            a.issue(1).unwrap();
        }
        a.raise_floor().unwrap();
        let issued_before_the_power_loss = a.issue(1).unwrap();
        // A power loss takes the unsynced `issued` back to nothing.
        a.write(ISSUED_AT, 0).unwrap();
        drop(a);
        let b = open(dir.path());
        // The floor covers what was issued before it; the record read again the rest.
        b.note(&Entry {
            key: b"k".to_vec(),
            state: Some(crate::idempotency::KeyRecord {
                fingerprint: [0; 32],
                state: KeyState::Claimed {
                    token: issued_before_the_power_loss,
                    lease_until_ms: 0,
                },
            }),
        });
        assert!(b.issue(1).unwrap() > issued_before_the_power_loss);
    }

    #[test]
    fn the_floor_alone_keeps_tokens_above_those_of_dropped_records() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path());
        let high = (0..5).map(|_| a.issue(1).unwrap()).last().unwrap();
        a.raise_floor().unwrap();
        a.write(ISSUED_AT, 0).unwrap();
        drop(a);
        assert!(open(dir.path()).issue(1).unwrap() > high);
    }

    #[test]
    fn a_counter_that_does_not_check_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path());
        a.issue(1).unwrap();
        a.raise_floor().unwrap();
        a.file.write_all_at(&[0xff], FLOOR_AT + 2).unwrap();
        let err = Tokens::open(dir.path().join("tokens")).err().unwrap();
        assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
        a.file.write_all_at(&[0xff], ISSUED_AT + 1).unwrap();
        assert_eq!(
            a.issue(1).unwrap_err().code(),
            ErrorCode::DataCorruption.raw()
        );
    }
}
