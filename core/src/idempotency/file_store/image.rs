//! The index image: the in-memory index written to `index`, so that a restart loads it and
//! replays only the journal past the offset it covers, instead of the whole journal.
//!
//! `magic | journal inode | anchor | covered | table slots | keys | 0 | claims | crc32`
//! (64 bytes, little-endian), then the keys' slots (hash and offset, 16 bytes a key), in
//! table order, so that loading them into a table of the same size writes it in order. `anchor` is the CRC field of
//! the journal's last record before `covered`: with the inode it ties the image to one
//! journal file. An image that does not check or does not match is ignored (the journal
//! is then read whole): it only saves time, the journal stays the truth.

use super::files::{create_fresh, Paced, SYNC_EVERY};
use super::index::{Index, Slot};
use crate::durable::FileError;
use crate::error::Result;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const MAGIC: &[u8; 8] = b"BCKIDX01";
const HEADER: usize = 64;
const SLOT: usize = 16;
const BUFFER: usize = 4 << 20;

/// What ties an image to the journal it describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Covers {
    pub inode: u64,
    pub anchor: u32,
    pub covered: u64,
}

impl Covers {
    /// The tie for `journal` up to `covered` (the end of a whole record, past 0).
    pub fn of(journal: &File, covered: u64) -> io::Result<Covers> {
        let mut anchor = [0; 4];
        journal.read_exact_at(&mut anchor, covered - 4)?;
        Ok(Covers {
            inode: journal.metadata()?.ino(),
            anchor: u32::from_le_bytes(anchor),
            covered,
        })
    }
}

/// Writes an image to a side file, in pieces, then renames it over `index`.
pub(super) struct ImageWriter {
    file: File,
    crc: crc32fast::Hasher,
    buffer: Vec<u8>,
    written: u64,
    keys: u64,
    /// Slots of the table the image is of (its size when loaded).
    table: u64,
    claims: u64,
    paced: Paced,
}

impl ImageWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = create_fresh(path)?;
        Ok(ImageWriter {
            file,
            crc: crc32fast::Hasher::new(),
            buffer: Vec::with_capacity(SYNC_EVERY as usize + 64 * 1024),
            written: HEADER as u64,
            keys: 0,
            table: 0,
            claims: 0,
            paced: Paced::default(),
        })
    }

    /// Adds the next slots, as of the journal up to `covered`.
    pub fn push(&mut self, slots: &[Slot], covered: u64, path: &Path) -> Result<()> {
        self.table += slots.len() as u64;
        for slot in slots.iter().filter(|s| s.covered_by(covered)) {
            self.keys += 1;
            self.claims += slot.is_claim() as u64;
            self.buffer.extend_from_slice(&slot.hash.to_le_bytes());
            self.buffer.extend_from_slice(&slot.meta.to_le_bytes());
            // A whole table (hundreds of MB) is pushed at once by a compaction: written
            // and synced a piece at a time all the same.
            if self.buffer.len() >= SYNC_EVERY as usize {
                self.flush(path)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, path: &Path) -> Result<()> {
        self.crc.update(&self.buffer);
        self.file
            .write_all_at(&self.buffer, self.written)
            .and_then(|()| self.paced.wrote(&self.file, self.buffer.len()))
            .map_err(|e| FileError::new("write", path, e))?;
        self.written += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Writes the header and makes the image durable (the caller renames it into place).
    pub fn finish(mut self, covers: Covers, path: &Path) -> Result<()> {
        self.flush(path)?;
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&covers.inode.to_le_bytes());
        header.extend_from_slice(&covers.anchor.to_le_bytes());
        for n in [covers.covered, self.table, self.keys, 0, self.claims] {
            header.extend_from_slice(&n.to_le_bytes());
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.combine(&self.crc);
        header.extend_from_slice(&crc.finalize().to_le_bytes());
        debug_assert_eq!(header.len(), HEADER);
        self.file
            .write_all_at(&header, 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| FileError::new("write", path, e))?;
        Ok(())
    }
}

/// The index of `journal` as the image at `path` has it, and the offset it covers; `None`
/// when there is no image of this journal or it does not check.
pub(super) fn load(path: &Path, journal: &File) -> Option<(Index, u64)> {
    match try_load(path, journal) {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::info!(image = %path.display(), error = %e, "idempotency index image not used; reading the journal");
            None
        }
    }
}

fn try_load(path: &Path, journal: &File) -> io::Result<Option<(Index, u64)>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut header = [0u8; HEADER];
    file.read_exact(&mut header)?;
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
    let stored = Covers {
        inode: u64_at(8),
        anchor: u32::from_le_bytes(header[16..20].try_into().unwrap()),
        covered: u64_at(20),
    };
    let (table, keys, claims) = (u64_at(28), u64_at(36), u64_at(52));
    let journal_len = journal.metadata()?.len();
    if &header[..8] != MAGIC
        || stored.covered < 4
        || stored.covered > journal_len
        || !table.is_power_of_two()
        || keys > table
        || file.metadata()?.len() != HEADER as u64 + keys * SLOT as u64
        || Covers::of(journal, stored.covered)? != stored
    {
        return Ok(None);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..HEADER - 4]);
    let mut index = Index::with_slots(table as usize);
    let mut buffer = vec![0; BUFFER];
    let mut left = keys as usize * SLOT;
    while left > 0 {
        let n = left.min(BUFFER);
        file.read_exact(&mut buffer[..n])?;
        crc.update(&buffer[..n]);
        for bytes in buffer[..n].chunks_exact(SLOT) {
            let slot = Slot {
                hash: u64::from_le_bytes(bytes[..8].try_into().unwrap()),
                meta: u64::from_le_bytes(bytes[8..].try_into().unwrap()),
            };
            if !slot.covered_by(stored.covered) {
                return Ok(None);
            }
            index.insert_loaded(slot);
        }
        left -= n;
    }
    if crc.finalize().to_le_bytes() != header[HEADER - 4..] || index.claims() != claims {
        return Ok(None);
    }
    Ok(Some((index, stored.covered)))
}
