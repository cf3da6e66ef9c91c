//! The idempotency store on a real 3-member etcd cluster on loopback (started here, like
//! the tests), reported against its floor measured in the same run: two raw etcd-client
//! transactions per key (the claim, bound to one lease granted up front, and the
//! completion, compared on the claim's revision; values of the store's record sizes, 25
//! and 21 bytes). Rounds of both are interleaved and the median round of each is compared.
//!
//!   cargo bench --bench etcd            (target: 1 thread within 1.15x of the floor;
//!   cargo bench --bench etcd -- quick    8 threads at least 4x the 1-thread rate)
//!
//! Then the footprint of a key in etcd, on a fresh cluster: the raft index advanced per
//! key (the raft writes a key costs, whatever their kind: lease grants and revocations are
//! raft entries too), the leases alive right after the fill, the DB size and the size in
//! use before and after filling it with completed keys (32-byte fingerprints, keys shaped
//! like a 64 KiB block's id), then after compaction and defragmentation of every member,
//! per live key; and the raw key + value bytes of a key.
//!
//!   cargo bench --bench etcd -- footprint [keys]   (only the footprint; 10000 keys)

#[path = "../tests/common/etcd.rs"]
mod etcd_cluster;

use backup_coordinator::clock::unix_ms_now;
use backup_coordinator::etcd::idempotency::EtcdIdempotencyStore;
use backup_coordinator::etcd::{EtcdClient, EtcdSettings};
use backup_coordinator::idempotency::{fingerprint, Claim, Completion, IdempotencyStore};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

static NEXT: AtomicU64 = AtomicU64::new(0);

fn fresh_key() -> String {
    format!("bench/{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Keys per second through the store, `threads` callers sharing one store.
/// One new key through the store: claimed, then completed with its fingerprint.
fn claim_and_complete(store: &EtcdIdempotencyStore, key: &str) {
    let fp = fingerprint(key.as_bytes());
    let Claim::Acquired { token, .. } = store.claim(key.as_bytes(), &fp, unix_ms_now()).unwrap()
    else {
        panic!("a fresh key is acquired")
    };
    let done = store.complete(key.as_bytes(), token, &fp, 0, unix_ms_now());
    assert_eq!(done.unwrap(), Completion::Recorded);
}

fn store_rate(store: &Arc<EtcdIdempotencyStore>, threads: usize, keys: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..keys / threads {
                    claim_and_complete(store, &fresh_key());
                }
            });
        }
    });
    keys as f64 / start.elapsed().as_secs_f64()
}

/// Keys per second of two raw transactions per key issued directly, by `tasks` concurrent
/// tasks: the claim (created while absent, bound to a lease granted once) and the completion
/// (compared on the claim's revision, bound to a long lease).
fn floor_rate(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    tasks: usize,
    keys: usize,
) -> f64 {
    runtime.block_on(async {
        let completion_lease = client.clone().lease_grant(3600, None).await.unwrap().id();
        let session = client.clone().lease_grant(90, None).await.unwrap().id();
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let mut client = client.clone();
            set.spawn(async move {
                for _ in 0..keys / tasks {
                    let key = format!("/bench/floor/{}", fresh_key()).into_bytes();
                    let claim = Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key.clone(),
                            vec![b'c'; 25],
                            Some(PutOptions::new().with_lease(session)),
                        )])
                        .or_else([TxnOp::get(key.clone(), None)]);
                    let claimed = client.txn(claim).await.unwrap();
                    assert!(claimed.succeeded());
                    let revision = claimed.header().unwrap().revision();
                    let complete = Txn::new()
                        .when([Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            revision,
                        )])
                        .and_then([TxnOp::put(
                            key.clone(),
                            vec![b'd'; 21],
                            Some(PutOptions::new().with_lease(completion_lease)),
                        )])
                        .or_else([TxnOp::get(key.clone(), None)]);
                    assert!(client.txn(complete).await.unwrap().succeeded());
                }
            });
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
        let _ = client.clone().lease_revoke(session).await;
        keys as f64 / start.elapsed().as_secs_f64()
    })
}

/// CPU time (user + system) a process has used so far, in ms; `None` for this process.
fn cpu_ms(pid: Option<u32>) -> f64 {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    ticks * 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Runs `phase` and returns its result with the CPU ms per key it cost the members and
/// this process.
fn with_cpu<T>(members: &[u32], keys: usize, phase: impl FnOnce() -> T) -> (T, f64, f64) {
    let etcd = |ms: &[u32]| ms.iter().map(|p| cpu_ms(Some(*p))).sum::<f64>();
    let (e0, c0) = (etcd(members), cpu_ms(None));
    let out = phase();
    let (e1, c1) = (etcd(members), cpu_ms(None));
    (out, (e1 - e0) / keys as f64, (c1 - c0) / keys as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    let keys = args
        .iter()
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(10_000);
    if !args.iter().any(|a| a == "footprint") {
        rates(quick);
    }
    footprint(keys);
}

fn rates(quick: bool) {
    let (rounds, keys) = if quick { (3, 200) } else { (5, 400) };
    let cluster = etcd_cluster::Cluster::start(3);
    let mut settings = EtcdSettings::new(cluster.endpoints());
    settings.prefix = "/bench/".into();
    let etcd = Arc::new(EtcdClient::new(&settings).unwrap());
    let store = Arc::new(EtcdIdempotencyStore::new(
        etcd.clone(),
        Duration::from_secs(90),
        Duration::from_secs(3600),
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The floor talks to the member the store talks to (picked at random): a follower
    // forwards each write to the leader, which costs a hop the leader does not.
    let client = runtime
        .block_on(Client::connect([etcd.endpoint().to_string()], None))
        .unwrap();
    // Warm both paths (connections, the completion lease).
    store_rate(&store, 1, 20);
    floor_rate(&runtime, &client, 1, 20);

    let members: Vec<u32> = (0..3).map(|i| cluster.pid(i)).collect();
    let (mut one, mut eight, mut floor, mut floor8) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cpu8, mut cpu_floor8) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        floor.push(floor_rate(&runtime, &client, 1, keys));
        one.push(store_rate(&store, 1, keys));
        let (rate, etcd, own) = with_cpu(&members, keys * 4, || {
            floor_rate(&runtime, &client, 8, keys * 4)
        });
        floor8.push(rate);
        cpu_floor8.push((etcd, own));
        let (rate, etcd, own) = with_cpu(&members, keys * 4, || store_rate(&store, 8, keys * 4));
        eight.push(rate);
        cpu8.push((etcd, own));
    }
    let (one, eight, floor, floor8) = (median(one), median(eight), median(floor), median(floor8));
    let cpu = |v: &[(f64, f64)]| {
        (
            median(v.iter().map(|c| c.0).collect()),
            median(v.iter().map(|c| c.1).collect()),
        )
    };
    let ((store_etcd, store_own), (floor_etcd, floor_own)) = (cpu(&cpu8), cpu(&cpu_floor8));
    let status = runtime.block_on(client.clone().status()).unwrap();
    let role = match status.header() {
        Some(h) if h.member_id() == status.leader() => "the leader",
        _ => "a follower",
    };
    println!("etcd idempotency store, 3-member loopback cluster, claim + completion per key ({rounds} rounds, medians):");
    println!(
        "  the store and the floor talk to {} ({role})",
        etcd.endpoint()
    );
    println!("  floor (two raw etcd-client txns per key): {floor:8.0} keys/s");
    println!(
        "  1 thread:  {one:8.0} keys/s  = floor time x {:.2}  (target <= 1.15)",
        floor / one
    );
    println!(
        "  8 threads: {eight:8.0} keys/s  = 1-thread rate x {:.1}  (target >= 4)",
        eight / one
    );
    println!(
        "  (the cluster's own scaling: 8 concurrent floors {floor8:8.0} keys/s = x {:.1} the 1-task floor; the store's 8 threads reach {:.2} of it)",
        floor8 / floor,
        eight / floor8
    );
    println!(
        "  CPU per key at 8 threads: the store {store_etcd:.2} ms in etcd + {store_own:.2} ms here; 8 floors {floor_etcd:.2} ms in etcd + {floor_own:.2} ms here"
    );
}

/// A key like taosX's for one 64 KiB block: task, vgroup, block number (33 bytes).
fn block_key(i: usize) -> String {
    format!("task-0042/vg-{:03}/blk-{i:012}", i % 128)
}

/// DB size, size in use, revision and raft index of `member`.
fn status(runtime: &tokio::runtime::Runtime, member: &Client) -> (i64, i64, i64, u64) {
    let status = runtime.block_on(member.clone().status()).unwrap();
    let revision = status.header().map_or(0, |h| h.revision());
    (
        status.db_size(),
        status.raft_used_db_size(),
        revision,
        status.raft_index(),
    )
}

fn lease_count(runtime: &tokio::runtime::Runtime, member: &Client) -> usize {
    runtime
        .block_on(member.clone().leases())
        .unwrap()
        .leases()
        .len()
}

/// Fills a fresh cluster with `n` completed keys through the store and prints what each
/// costs in etcd: DB size and size in use (member 0) before and after, with and without
/// compaction + defragmentation (every member), and the raw key + value bytes.
fn footprint(n: usize) {
    let cluster = etcd_cluster::Cluster::start(3);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let members: Vec<Client> = cluster
        .endpoints()
        .into_iter()
        .map(|e| runtime.block_on(Client::connect([e], None)).unwrap())
        .collect();
    // The default prefix: its length counts in every key.
    let settings = EtcdSettings::new(cluster.endpoints());
    let store = Arc::new(EtcdIdempotencyStore::new(
        Arc::new(EtcdClient::new(&settings).unwrap()),
        Duration::from_secs(90),
        Duration::from_secs(24 * 3600),
    ));
    let (db0, used0, _, raft0) = status(&runtime, &members[0]);
    let leases0 = lease_count(&runtime, &members[0]);
    let next = AtomicU64::new(0);
    let peak_leases = AtomicU64::new(0);
    let filled = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        // The leases alive while the keys are in flight, sampled every 50 ms.
        s.spawn(|| {
            let sampler = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let member = sampler
                .block_on(Client::connect([cluster.endpoints()[0].clone()], None))
                .unwrap();
            while !filled.load(Ordering::Relaxed) {
                let live = lease_count(&sampler, &member) as u64;
                peak_leases.fetch_max(live, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut fillers = Vec::new();
        for _ in 0..8 {
            fillers.push(s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                claim_and_complete(&store, &block_key(i));
            }));
        }
        for filler in fillers {
            filler.join().unwrap();
        }
        filled.store(true, Ordering::Relaxed);
    });
    let fill_rate = n as f64 / start.elapsed().as_secs_f64();
    let leases_after_fill = lease_count(&runtime, &members[0]);
    // Leases revoked in the background: wait for them to be gone.
    let waited = Instant::now();
    while lease_count(&runtime, &members[0]) > leases0 + 4
        && waited.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (db1, used1, revision, raft1) = status(&runtime, &members[0]);
    let leases1 = lease_count(&runtime, &members[0]);
    let (mut raw, mut count) = (0usize, 0usize);
    let all = runtime
        .block_on(members[0].clone().get(
            settings.prefix.as_bytes(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        ))
        .unwrap();
    let sample = all.kvs().first().map(|kv| {
        (
            String::from_utf8_lossy(kv.key()).into_owned(),
            kv.key().len(),
            kv.value().len(),
        )
    });
    for kv in all.kvs() {
        raw += kv.key().len() + kv.value().len();
        count += 1;
    }
    assert_eq!(count, n, "every key is live");
    runtime
        .block_on(members[0].clone().compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        ))
        .unwrap();
    for member in &members {
        runtime.block_on(member.clone().defragment()).unwrap();
    }
    let (db2, used2, _, _) = status(&runtime, &members[0]);
    let per = |a: i64, b: i64| (a - b) as f64 / n as f64;
    println!(
        "\netcd footprint of a completed idempotency key, 3-member loopback cluster, {n} keys \
         (filled by 8 threads at {fill_rate:.0} keys/s):"
    );
    if let Some((key, k, v)) = sample {
        println!("  one key: {key:?} ({k} bytes of etcd key, {v} bytes of value)");
    }
    println!(
        "  raft index advanced per key:         {:6.2} raft writes/key (target <= 2.1)",
        (raft1 - raft0) as f64 / n as f64
    );
    println!(
        "  live leases: {leases0} before, at most {} during the fill (8 threads), {leases_after_fill} right after it, {leases1} once settled",
        peak_leases.load(Ordering::Relaxed)
    );
    println!(
        "  raw key + value:                     {:6.1} bytes/key",
        raw as f64 / n as f64
    );
    println!("  fresh cluster:                       db {db0} B, in use {used0} B");
    println!(
        "  filled, before compaction:           db {db1} B ({:6.1} B/key), in use {used1} B ({:6.1} B/key)",
        per(db1, db0),
        per(used1, used0)
    );
    println!(
        "  after compaction + defrag (every member): db {db2} B ({:6.1} B/key), in use {used2} B ({:6.1} B/key) (target <= 150 B/key)",
        per(db2, db0),
        per(used2, used0)
    );
}
