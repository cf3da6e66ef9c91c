//! Following another process's compaction without stalling every process: the new
//! journal's index is loaded from its image with no lock held (a few hundred ms at 10 M
//! keys), and only then installed under the locks, where just the journal past the image
//! is read. Before, the image was loaded under the journal's `flock`, so that every
//! process waited for it.

use super::files::open_rw;
use super::image;
use super::index::Index;
use super::{FileStore, Held, Inner};
use crate::durable::FileError;
use crate::error::Failure;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// The index of a journal that replaced the one in use, loaded ahead of the switch.
pub(super) struct Followed {
    journal: Arc<File>,
    inode: u64,
    index: Index,
    /// The journal offset the index covers.
    end: u64,
}

impl FileStore {
    /// Whether the journal this process reads was replaced (renamed over by a compaction).
    pub(super) fn replaced(&self, inner: &Inner) -> Result<bool, Failure> {
        let meta = inner
            .journal
            .metadata()
            .map_err(|e| FileError::new("stat", &self.journal_path, e))?;
        Ok(meta.nlink() == 0)
    }

    /// Loads the index of the journal now in place, holding no lock but `followed` (the
    /// other threads that need it wait for this one's load rather than load it again).
    pub(super) fn prepare_follow(&self) -> Result<(), Failure> {
        let mut followed = self.followed.lock();
        let journal = Arc::new(open_rw(&self.journal_path)?);
        let inode = journal
            .metadata()
            .map_err(|e| FileError::new("stat", &self.journal_path, e))?
            .ino();
        if followed.as_ref().is_some_and(|f| f.inode == inode) {
            return Ok(());
        }
        *followed = None;
        let (index, end) = image::load(&self.image_path, &journal).unwrap_or_default();
        *followed = Some(Followed {
            journal,
            inode,
            index,
            end,
        });
        Ok(())
    }

    /// The journal now in place and its index as far as loaded (under the locks): the
    /// one prepared ahead when it is of this journal, else loaded now.
    pub(super) fn follow(&self) -> Result<(Arc<File>, Index, u64), Failure> {
        let _held = Held::since_now(&self.longest_hold_us);
        let journal = Arc::new(open_rw(&self.journal_path)?);
        let inode = journal
            .metadata()
            .map_err(|e| FileError::new("stat", &self.journal_path, e))?
            .ino();
        // Never wait here for a load in progress: it may be of another file.
        let prepared = self.followed.try_lock().and_then(|mut f| f.take());
        if let Some(f) = prepared.filter(|f| f.inode == inode) {
            return Ok((f.journal, f.index, f.end));
        }
        let (index, end) = image::load(&self.image_path, &journal).unwrap_or_default();
        Ok((journal, index, end))
    }
}
