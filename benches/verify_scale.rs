//! `store verify` at scale (docs/C_API.md §11): how many keys a second the check of every
//! journal record reads.
//!
//! Fills a store under a temporary directory: the first 1000 keys through the store itself
//! (claim and complete, as key_store_scale fills, so that the token counters exist), the
//! rest appended as the same completion records (`record::encode`), which is what a store
//! of that many live keys holds after a compaction; filling 10 M keys through claims takes
//! far longer than the check being measured. Then times `file_store::verify` over it,
//! twice (the second run reads from the page cache for certain).
//!
//!     cargo bench --bench verify_scale            # 1 M keys
//!     cargo bench --bench verify_scale -- 10m     # 10 M keys (about 750 MB of journal)
//!     VERIFY_SCALE_DIR=/some/disk cargo bench ... # where the store goes (default: $TMPDIR)
//!     VERIFY_SCALE_KEEP=1 cargo bench ...          # keep the store (its config is printed),
//!                                                  # for timing `backup-coordinator store verify`
//!
//! Run 1 reads the journal from the disk: its pages are dropped from the page cache first
//! (`posix_fadvise(DONTNEED)` of that file only, after an fsync). Run 2 reads it cached.

use backup_coordinator::idempotency::file_store::{
    self, FileIdempotencySettings, FileIdempotencyStore,
};
use backup_coordinator::idempotency::record;
use backup_coordinator::idempotency::{Claim, ClaimToken, IdempotencyStore, KeyRecord, KeyState};
use std::io::Write;
use std::time::{Duration, Instant};

const THROUGH_THE_STORE: u64 = 1000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let keys: u64 = if args.iter().any(|a| a == "10m") {
        10_000_000
    } else if args.iter().any(|a| a == "quick") {
        100_000
    } else {
        1_000_000
    };
    let base = std::env::var_os("VERIFY_SCALE_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let settings =
        FileIdempotencySettings::new(Duration::from_secs(60), Duration::from_secs(86_400));
    let fp = [7u8; 32];
    let started = Instant::now();
    {
        let store = FileIdempotencyStore::open(dir.path(), settings).unwrap();
        for i in 0..THROUGH_THE_STORE.min(keys) {
            let key = format!("key-{i:08}");
            let Ok(Claim::Acquired { token, .. }) = store.claim(key.as_bytes(), &fp, 10) else {
                panic!("{key} not acquired");
            };
            store.complete(key.as_bytes(), token, &fp, 0, 10).unwrap();
        }
    }
    let journal = dir.path().join("idempotency/journal");
    let mut out = std::io::BufWriter::with_capacity(
        4 << 20,
        std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap(),
    );
    let mut buf = Vec::with_capacity(128);
    for i in THROUGH_THE_STORE.min(keys)..keys {
        buf.clear();
        let done = KeyRecord {
            fingerprint: fp,
            state: KeyState::Completed {
                token: ClaimToken(1_000_000 + i),
                result: 0,
                expires_at_ms: u64::MAX / 2,
            },
        };
        record::encode(&mut buf, format!("key-{i:08}").as_bytes(), Some(&done));
        out.write_all(&buf).unwrap();
    }
    out.flush().unwrap();
    drop(out);
    let bytes = std::fs::metadata(&journal).unwrap().len();
    println!(
        "filled {keys} keys ({} records, {:.0} MB) in {:.1} s",
        keys + THROUGH_THE_STORE.min(keys),
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    for run in 1..=2 {
        if run == 1 {
            let file = std::fs::File::open(&journal).unwrap();
            file.sync_all().unwrap();
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        }
        let started = Instant::now();
        let verified = file_store::verify(dir.path(), |_, _| {}).unwrap();
        let seconds = started.elapsed().as_secs_f64();
        assert!(verified.is_ok(), "{verified:?}");
        assert_eq!(verified.bytes, bytes);
        println!(
            "verify run {run}: {} records, {keys} keys in {seconds:.2} s: {:.0} keys/s, {:.0} records/s, {:.0} MB/s",
            verified.records,
            keys as f64 / seconds,
            verified.records as f64 / seconds,
            bytes as f64 / 1e6 / seconds
        );
    }
    if std::env::var_os("VERIFY_SCALE_KEEP").is_some() {
        let kept = dir.keep();
        let config = kept.join("plugin.toml");
        std::fs::write(&config, format!("state_dir = \"{}\"\n", kept.display())).unwrap();
        println!(
            "kept: backup-coordinator --config {} store verify",
            config.display()
        );
    }
}
