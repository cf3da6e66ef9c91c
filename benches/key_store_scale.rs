//! The idempotency key store at scale (issue 14): fills a store to 1 M and 10 M live keys
//! through the store API (8 threads, new keys, 32-byte fingerprints; a housekeeping thread
//! calls `maintain` as the lease thread does) and prints, against its floor or target:
//!
//! - memory per live key: the process's RSS growth over the filled store (target ≤ 64 B);
//! - bytes on disk per live key once compacted (target ≤ 100 B);
//! - restart: open plus the first call (target ≤ 2 s);
//! - claim rate (claim + complete of new keys) and replay rate (claims of completed keys) at
//!   N keys against an empty store measured in the same process (target: at least 1/1.2);
//! - the longest single call (claim + complete) and its 99th percentile while filling, and
//!   among the calls that overlapped a compaction (target: a few ms);
//! - bytes read from the device per replay (page-cache misses).
//!
//! Each case runs in a child process of its own, so that its RSS is its own store's.
//!
//!   cargo bench --bench key_store_scale              1 M and 10 M, on /dev/shm and on disk
//!   cargo bench --bench key_store_scale -- quick     1 M only (also KEY_STORE_SCALE=quick)
//!   cargo bench --bench key_store_scale -- 10m disk  10 M only, on disk only (`tmpfs` too)
//!
//!   cargo bench --bench key_store_scale -- replays <dir> <keys>
//!                                                replays only, of a store kept in <dir>
//!                                                (filled by the first run; remove it after)
//!
//! On disk means a directory under `target/` (override with KEY_STORE_SCALE_DISK=<dir>).

use backup_coordinator::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
use backup_coordinator::idempotency::{fingerprint, Claim, IdempotencyStore};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const THREADS: u64 = 8;
/// Keys of the empty store.
const SAMPLE: u64 = 100_000;
/// Rounds of rate measurements, and calls per round.
const ROUNDS: u64 = 5;
const ROUND: u64 = 20_000;
/// Replays per round: several times a round of claims, as a replay is that much quicker
/// (a round of 20,000 took 20 to 40 ms, a scheduling hiccup's length on a shared machine).
const REPLAY_ROUND: u64 = 100_000;
const NOW_MS: u64 = 1_700_000_000_000;

fn settings() -> FileIdempotencySettings {
    // The plugin's defaults: 90 s lease, 24 h TTL, 4 MB slack.
    FileIdempotencySettings::new(Duration::from_secs(90), Duration::from_secs(24 * 3600))
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// The process's peak RSS so far.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn key(prefix: &str, i: u64) -> Vec<u8> {
    // A block key as taosX would form it: job, vnode, block number.
    format!("{prefix}/vnode-{}/block-{i:012}", i % 128).into_bytes()
}

/// Call durations in 10 µs steps up to 100 ms (the longest is kept apart).
struct Histogram {
    counts: Vec<u64>,
    longest_us: u64,
}

const STEP_US: u64 = 10;
const BUCKETS: usize = 10_000;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS + 1],
            longest_us: 0,
        }
    }
    fn add(&mut self, us: u64) {
        self.counts[((us / STEP_US) as usize).min(BUCKETS)] += 1;
        self.longest_us = self.longest_us.max(us);
    }
    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.longest_us = self.longest_us.max(other.longest_us);
    }
    /// The longest and the 99th percentile, in ms.
    fn worst_and_p99(&self) -> (f64, f64) {
        let total: u64 = self.counts.iter().sum();
        let mut seen = 0;
        let mut p99 = 0;
        for (at, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen * 100 >= total * 99 {
                p99 = (at as u64 + 1) * STEP_US;
                break;
            }
        }
        let p99 = p99.min(self.longest_us);
        (self.longest_us as f64 / 1000.0, p99 as f64 / 1000.0)
    }
}

/// What a fill saw.
struct Filled {
    rate: f64,
    all: Histogram,
    /// Calls that overlapped a `maintain` call: (start since the origin, duration) in µs.
    near_maintenance: Vec<(u64, u64)>,
}

/// Claims and completes keys `range` of `prefix` from 8 threads, timing every call;
/// `maintaining` is set while the housekeeping thread runs `maintain`.
fn fill(
    store: &FileIdempotencyStore,
    prefix: &str,
    range: std::ops::Range<u64>,
    origin: Instant,
    maintaining: &AtomicBool,
) -> Filled {
    let next = AtomicU64::new(range.start);
    let started = Instant::now();
    let mut filled = Filled {
        rate: 0.0,
        all: Histogram::new(),
        near_maintenance: Vec::new(),
    };
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    let (mut all, mut near) = (Histogram::new(), Vec::new());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= range.end {
                            break (all, near);
                        }
                        let key = key(prefix, i);
                        let fp = fingerprint(&key);
                        let during = maintaining.load(Ordering::Relaxed);
                        let t = Instant::now();
                        let Claim::Acquired { token, .. } = store.claim(&key, &fp, NOW_MS).unwrap()
                        else {
                            panic!("a new key was not acquired");
                        };
                        store.complete(&key, token, &fp, 0, NOW_MS).unwrap();
                        let took = t.elapsed().as_micros() as u64;
                        all.add(took);
                        if during || maintaining.load(Ordering::Relaxed) {
                            near.push((t.duration_since(origin).as_micros() as u64, took));
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            let (all, near) = thread.join().unwrap();
            filled.all.merge(&all);
            filled.near_maintenance.extend(near);
        }
    });
    filled.rate = (range.end - range.start) as f64 / started.elapsed().as_secs_f64();
    filled
}

/// Bytes this process has made the kernel read from a block device (page-cache misses).
fn disk_read_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    let line = io.lines().find(|l| l.starts_with("read_bytes:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Claims `REPLAY_ROUND` completed keys picked at random among the first `live`: replays/s.
fn replay(store: &FileIdempotencyStore, prefix: &str, live: u64) -> f64 {
    let done = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let done = &done;
            scope.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(t);
                while done.fetch_add(1, Ordering::Relaxed) < REPLAY_ROUND {
                    let key = key(prefix, rng.u64(0..live));
                    let fp = fingerprint(&key);
                    let claim = store.claim(&key, &fp, NOW_MS + 1).unwrap();
                    assert_eq!(claim, Claim::Replay { result: 0 });
                }
            });
        }
    });
    REPLAY_ROUND as f64 / started.elapsed().as_secs_f64()
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rates[rates.len() / 2]
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("idempotency"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// One case, in this (child) process: prints one `result` line for the parent.
fn run_case(base: &Path, live: u64) {
    let empty_dir = base.join("empty");
    let full_dir = base.join("full");
    // The empty store: the reference, measured in rounds interleaved with the full one's
    // (the machine is shared and noisy).
    let empty = FileIdempotencyStore::open(&empty_dir, settings()).unwrap();
    let origin = Instant::now();
    let maintaining = AtomicBool::new(false);
    fill(&empty, "empty", 0..SAMPLE, origin, &maintaining);
    let rss_before = rss_bytes();
    let store = FileIdempotencyStore::open(&full_dir, settings()).unwrap();
    let stop = AtomicBool::new(false);
    let (filled, compacting) = std::thread::scope(|scope| {
        // Housekeeping as the lease thread does it (its tick, or woken when due); it
        // notes when each compaction ran.
        let keeper = scope.spawn(|| {
            let mut windows = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (before, t) = (store.compactions(), Instant::now());
                maintaining.store(true, Ordering::Relaxed);
                store.maintain(NOW_MS).unwrap();
                maintaining.store(false, Ordering::Relaxed);
                if store.compactions() > before {
                    let from = t.duration_since(origin).as_micros() as u64;
                    windows.push((from, from + t.elapsed().as_micros() as u64));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            windows
        });
        let out = fill(&store, "full", 0..live, origin, &maintaining);
        stop.store(true, Ordering::Relaxed);
        (out, keeper.join().unwrap())
    });
    let fill_rate = filled.rate;
    let hold = store.longest_maintenance_hold();
    let hold_running = store.longest_maintenance_hold_running();
    let (worst, p99) = filled.all.worst_and_p99();
    // Calls that overlapped a compaction.
    let mut during = Histogram::new();
    let mut during_calls = 0;
    for (at, took) in &filled.near_maintenance {
        if compacting
            .iter()
            .any(|(from, to)| *at < *to && at + took > *from)
        {
            during.add(*took);
            during_calls += 1;
        }
    }
    let (worst_compacting, p99_compacting) = during.worst_and_p99();
    drop(filled);
    let rss_after = rss_bytes();
    let peak = peak_rss_bytes();
    let (mut claims, mut replays) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut replay_reads = 0;
    for round in 0..ROUNDS {
        let keys = SAMPLE + round * ROUND..SAMPLE + (round + 1) * ROUND;
        claims[0].push(fill(&empty, "empty", keys.clone(), origin, &maintaining).rate);
        claims[1].push(fill(&store, "more", keys.clone(), origin, &maintaining).rate);
        replays[0].push(replay(&empty, "empty", SAMPLE));
        let read_before = disk_read_bytes();
        replays[1].push(replay(&store, "full", live));
        replay_reads += disk_read_bytes() - read_before;
    }
    let [claim_empty, claim_full] = claims.map(median);
    let [replay_empty, replay_full] = replays.map(median);
    drop(empty);
    std::fs::remove_dir_all(&empty_dir).unwrap();
    let live_total = live + SAMPLE + ROUNDS * ROUND;
    store.compact_now(NOW_MS).unwrap();
    let disk = dir_bytes(&full_dir);
    drop(store);

    let started = Instant::now();
    let store = FileIdempotencyStore::open(&full_dir, settings()).unwrap();
    let k = key("full", live / 2);
    let claim = store.claim(&k, &fingerprint(&k), NOW_MS + 2).unwrap();
    let restart = started.elapsed();
    assert_eq!(claim, Claim::Replay { result: 0 });
    drop(store);
    std::fs::remove_dir_all(&full_dir).unwrap();
    let fields = [
        (rss_after.saturating_sub(rss_before)) as f64 / live as f64,
        disk as f64 / live_total as f64,
        restart.as_secs_f64(),
        claim_empty,
        claim_full,
        replay_empty,
        replay_full,
        fill_rate,
        worst,
        p99,
        (peak.saturating_sub(rss_before)) as f64 / live as f64,
        compacting.len() as f64,
        during_calls as f64,
        worst_compacting,
        p99_compacting,
        replay_reads as f64 / (ROUNDS * REPLAY_ROUND) as f64,
        hold.as_secs_f64() * 1000.0,
        hold_running.as_secs_f64() * 1000.0,
    ];
    let fields: Vec<String> = fields.iter().map(f64::to_string).collect();
    println!("result {}", fields.join(" "));
}

/// Replays only, against a store kept in `base` between runs (filled on the first run):
/// quick to repeat, and to profile (`perf record`) the replay path alone.
fn run_replays(base: &Path, live: u64) {
    let full_dir = base.join("full");
    let filled = full_dir.join("idempotency/journal").exists();
    let store = FileIdempotencyStore::open(&full_dir, settings()).unwrap();
    if !filled {
        let origin = Instant::now();
        let maintaining = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    store.maintain(NOW_MS).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let filled = fill(&store, "full", 0..live, origin, &maintaining);
            stop.store(true, Ordering::Relaxed);
            println!("filled {live} keys at {:.0} keys/s", filled.rate);
        });
        store.compact_now(NOW_MS).unwrap();
    }
    let empty_dir = base.join("empty");
    let _ = std::fs::remove_dir_all(&empty_dir);
    let empty = FileIdempotencyStore::open(&empty_dir, settings()).unwrap();
    fill(
        &empty,
        "empty",
        0..SAMPLE,
        Instant::now(),
        &AtomicBool::new(false),
    );
    if std::env::var_os("KEY_STORE_SCALE_FULL_ONLY").is_some() {
        // For a profile of the full store's replays alone.
        let rates: Vec<f64> = (0..4 * ROUNDS)
            .map(|_| replay(&store, "full", live))
            .collect();
        println!("full store replays {:.0}/s", median(rates));
        return;
    }
    let mut replays = [Vec::new(), Vec::new()];
    for _ in 0..2 * ROUNDS {
        replays[0].push(replay(&empty, "empty", SAMPLE));
        replays[1].push(replay(&store, "full", live));
    }
    let [empty_rate, full_rate] = replays.map(median);
    println!(
        "replays at {live} keys: {full_rate:.0}/s, empty store {empty_rate:.0}/s: slowdown {:.2}",
        empty_rate / full_rate
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "case") {
        run_case(Path::new(&args[at + 1]), args[at + 2].parse().unwrap());
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "replays") {
        run_replays(Path::new(&args[at + 1]), args[at + 2].parse().unwrap());
        return;
    }
    let quick = args.iter().any(|a| a == "quick")
        || std::env::var("KEY_STORE_SCALE").is_ok_and(|v| v == "quick");
    let only_10m = args.iter().any(|a| a == "10m");
    let sizes: &[u64] = if quick {
        &[1_000_000]
    } else if only_10m {
        &[10_000_000]
    } else {
        &[1_000_000, 10_000_000]
    };
    // `tmpfs` or `disk` alone picks one place.
    let wanted = |place: &str| {
        let named = ["tmpfs", "disk"]
            .iter()
            .any(|p| args.iter().any(|a| a == p));
        !named || args.iter().any(|a| a == place)
    };
    let disk = std::env::var_os("KEY_STORE_SCALE_DISK")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/key-store-scale")
        });
    let places = [
        ("tmpfs", PathBuf::from("/dev/shm/key-store-scale")),
        ("disk", disk),
    ];
    println!("idempotency key store at scale: 8 threads, new keys, 32-byte fingerprints");
    let mut rows = Vec::new();
    for (name, base) in places.iter().filter(|(name, _)| wanted(name)) {
        for &live in sizes {
            let base = base.join(format!("{}-{live}", std::process::id()));
            let _ = std::fs::remove_dir_all(&base);
            std::fs::create_dir_all(&base).unwrap();
            let out = Command::new(&args[0])
                .args(["case", base.to_str().unwrap(), &live.to_string()])
                .stderr(std::process::Stdio::inherit())
                .output()
                .unwrap();
            let _ = std::fs::remove_dir_all(&base);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let Some(line) = stdout.lines().find(|l| l.starts_with("result ")) else {
                println!("{name} {live}: the case failed (its stderr is above)");
                continue;
            };
            let v: Vec<f64> = line[7..].split(' ').map(|x| x.parse().unwrap()).collect();
            let (mem, disk_b, restart) = (v[0], v[1], v[2]);
            let (ce, cf, re, rf, fill_rate) = (v[3], v[4], v[5], v[6], v[7]);
            let (worst, p99, peak) = (v[8], v[9], v[10]);
            let (compactions, during, worst_c, p99_c, reads) = (v[11], v[12], v[13], v[14], v[15]);
            let (hold, hold_running) = (v[16], v[17]);
            println!("{name}, {live} live keys (filled at {fill_rate:.0} keys/s):");
            println!(
                "  memory per key      {mem:7.1} B    ratio to target 64 B:  {:.2} (peak {peak:.1} B)",
                mem / 64.0
            );
            println!(
                "  disk per key        {disk_b:7.1} B    ratio to target 100 B: {:.2}",
                disk_b / 100.0
            );
            println!(
                "  restart (open+call) {restart:7.3} s    ratio to target 2 s:   {:.2}",
                restart / 2.0
            );
            println!(
                "  claim rate          {cf:7.0}/s  empty store {ce:.0}/s: slowdown {:.2} (target <= 1.2)",
                ce / cf
            );
            println!(
                "  replay rate         {rf:7.0}/s  empty store {re:.0}/s: slowdown {:.2} (target <= 1.2; {reads:.0} B read from the device per replay)",
                re / rf
            );
            println!(
                "  call (claim+complete) while filling: longest {worst:.1} ms, p99 {p99:.2} ms; during {compactions} compactions ({during} calls): longest {worst_c:.1} ms, p99 {p99_c:.2} ms; the mutex held by maintenance at most {hold:.1} ms ({hold_running:.1} ms without its waits for a core)"
            );
            rows.push(format!(
                "| {name} | {live} | {mem:.1} (peak {peak:.0}) | {disk_b:.1} | {restart:.3} | {:.2} | {:.2} | {worst_c:.1} / {p99_c:.2} | {worst:.1} / {p99:.2} | {hold:.1} ({hold_running:.1}) |",
                ce / cf,
                re / rf
            ));
        }
    }
    println!();
    println!("| store | live keys | RAM B/key | disk B/key | restart s | claim slowdown | replay slowdown | longest / p99 call during compaction, ms | longest / p99 call while filling, ms | longest hold of the mutex by maintenance (less waits for a core), ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
