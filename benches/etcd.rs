//! The idempotency store on a real 3-member etcd cluster on loopback (started here, like
//! the tests), reported against its floor measured in the same run: the same requests
//! issued directly with etcd-client (a claim lease, the claim transaction, the completion
//! transaction, the claim lease's revocation in the background). Rounds of both are
//! interleaved and the median round of each is compared.
//!
//!   cargo bench --bench etcd            (target: 1 thread within 1.3x of the floor;
//!   cargo bench --bench etcd -- quick    8 threads at least 4x the 1-thread rate)

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
fn store_rate(store: &Arc<EtcdIdempotencyStore>, threads: usize, keys: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..keys / threads {
                    let key = fresh_key();
                    let fp = fingerprint(key.as_bytes());
                    let Claim::Acquired { token, .. } =
                        store.claim(key.as_bytes(), &fp, unix_ms_now()).unwrap()
                    else {
                        panic!("a fresh key is acquired")
                    };
                    let done = store.complete(key.as_bytes(), token, &fp, 0, unix_ms_now());
                    assert_eq!(done.unwrap(), Completion::Recorded);
                }
            });
        }
    });
    keys as f64 / start.elapsed().as_secs_f64()
}

/// Keys per second of the same requests issued directly, by `tasks` concurrent tasks.
fn floor_rate(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    tasks: usize,
    keys: usize,
) -> f64 {
    runtime.block_on(async {
        let completion_lease = client.clone().lease_grant(3600, None).await.unwrap().id();
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let mut client = client.clone();
            set.spawn(async move {
                for _ in 0..keys / tasks {
                    let key = format!("/bench/floor/{}", fresh_key()).into_bytes();
                    let lease = client.lease_grant(90, None).await.unwrap().id();
                    let claim = Txn::new()
                        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key.clone(),
                            vec![b'c'; 90],
                            Some(PutOptions::new().with_lease(lease)),
                        )])
                        .or_else([TxnOp::get(key.clone(), None)]);
                    assert!(client.txn(claim).await.unwrap().succeeded());
                    let complete = Txn::new()
                        .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
                        .and_then([TxnOp::put(
                            key.clone(),
                            vec![b'd'; 90],
                            Some(PutOptions::new().with_lease(completion_lease)),
                        )])
                        .or_else([TxnOp::get(key.clone(), None)]);
                    assert!(client.txn(complete).await.unwrap().succeeded());
                    let mut revoker = client.clone();
                    tokio::spawn(async move {
                        let _ = revoker.lease_revoke(lease).await;
                    });
                }
            });
        }
        while let Some(done) = set.join_next().await {
            done.unwrap();
        }
        keys as f64 / start.elapsed().as_secs_f64()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (rounds, keys) = if quick { (3, 200) } else { (5, 400) };
    let cluster = etcd_cluster::Cluster::start(3);
    let mut settings = EtcdSettings::new(cluster.endpoints());
    settings.prefix = "/bench/".into();
    let store = Arc::new(EtcdIdempotencyStore::new(
        Arc::new(EtcdClient::new(&settings).unwrap()),
        Duration::from_secs(90),
        Duration::from_secs(3600),
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The floor talks to one member, as the store does.
    let client = runtime
        .block_on(Client::connect([cluster.endpoints()[0].clone()], None))
        .unwrap();
    // Warm both paths (connections, the completion lease).
    store_rate(&store, 1, 20);
    floor_rate(&runtime, &client, 1, 20);

    let (mut one, mut eight, mut floor, mut floor8) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        floor.push(floor_rate(&runtime, &client, 1, keys));
        one.push(store_rate(&store, 1, keys));
        floor8.push(floor_rate(&runtime, &client, 8, keys * 4));
        eight.push(store_rate(&store, 8, keys * 4));
    }
    let (one, eight, floor, floor8) = (median(one), median(eight), median(floor), median(floor8));
    println!("etcd idempotency store, 3-member loopback cluster, claim + completion per key ({rounds} rounds, medians):");
    println!("  floor (same requests, direct etcd-client): {floor:8.0} keys/s");
    println!(
        "  1 thread:  {one:8.0} keys/s  = floor time x {:.2}  (target <= 1.3)",
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
}
