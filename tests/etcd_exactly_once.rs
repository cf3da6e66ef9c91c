//! Reproductions on a real 3-member etcd cluster, each host reaching it through a fault
//! proxy per member (tests/common/proxy.rs): a claim whose answer is lost is the call's own
//! on retry (docs/C_API.md §8.1), a host cut off loses its claim before another takes it
//! over, and a log-backup run claim survives an outage shorter than its lease.

#[path = "common/etcd.rs"]
mod etcd_cluster;
#[path = "common/proxy.rs"]
mod proxy;

use backup_coordinator::clock::{unix_ms_now, SystemClock};
use backup_coordinator::error::{Error, ErrorCode};
use backup_coordinator::etcd::idempotency::EtcdIdempotencyStore;
use backup_coordinator::etcd::log_records::EtcdLogRecords;
use backup_coordinator::etcd::{EtcdClient, EtcdSettings};
use backup_coordinator::idempotency::keyed::Keyed;
use backup_coordinator::idempotency::{
    fingerprint, Claim, ClaimId, ClaimToken, IdempotencyStore, KeyState,
};
use backup_coordinator::log_backup::records::{LogRecordStore, Sequence};
use backup_coordinator::log_backup::SubCommand;
use backup_coordinator::retry::Execution;
use etcd_cluster::Cluster;
use proxy::{HostProxies, Mode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PREFIX: &str = "/taosx/exactly-once/";

fn client(endpoints: Vec<String>, timeout: Duration) -> Arc<EtcdClient> {
    let mut s = EtcdSettings::new(endpoints);
    s.prefix = PREFIX.into();
    s.timeout = timeout;
    Arc::new(EtcdClient::new(&s).unwrap())
}

fn idempotency(client: Arc<EtcdClient>, lease: Duration) -> Arc<EtcdIdempotencyStore> {
    Arc::new(EtcdIdempotencyStore::new(
        client,
        lease,
        Duration::from_secs(3600),
    ))
}

fn once(op: &mut dyn FnMut(u32) -> Result<(), Error>) -> Execution {
    Execution::once(op(0))
}

/// (a) The claim txn is applied, its answer lost, and the host cut off until the call gives
/// up; the call's retry (the same ClaimId) acquires that claim with its token, the
/// operation runs once, and the key is not left blocked IN_PROGRESS for a lease. (Before:
/// the retry granted a second lease, found a claim with another token and answered
/// IN_PROGRESS, the orphan blocking the key for the whole lease.)
#[test]
fn etcd_a_claim_whose_answer_was_lost_is_the_calls_own_on_retry() {
    let cluster = Cluster::start(3);
    let proxies = HostProxies::start(&cluster.endpoints());
    let lease = Duration::from_secs(30);
    let store = idempotency(client(proxies.endpoints(), Duration::from_secs(2)), lease);
    let keyed = Keyed::new(store.clone(), Arc::new(SystemClock), lease).unwrap();
    let other = idempotency(client(cluster.endpoints(), Duration::from_secs(5)), lease);
    let fp = fingerprint(b"a claim whose answer is lost");
    // The claim's value holds the fingerprint's first 16 bytes: no other request of the
    // call does (its completion comes after the claim).
    let fired = proxies.lose_the_answer_to(&fp[..16], Duration::from_millis(300));
    let unknown_before = backup_coordinator::metrics::store().unknown_outcomes.get();
    let retry = |op: &mut dyn FnMut(u32) -> Result<(), Error>| {
        let mut retries = 0;
        loop {
            match op(retries) {
                Ok(()) => {
                    return Execution {
                        result: Ok(()),
                        retries,
                        last_failure: None,
                    }
                }
                Err(failure) if retries < 3 => {
                    assert!(fired.load(Ordering::SeqCst), "{failure:?}");
                    // What the call left behind had time to give up; the outage ends.
                    std::thread::sleep(Duration::from_secs(3));
                    proxies.set_mode(Mode::Pass);
                    retries += 1;
                }
                Err(failure) => {
                    return Execution {
                        result: Err(failure),
                        retries,
                        last_failure: None,
                    }
                }
            }
        }
    };
    let runs = AtomicUsize::new(0);
    let execution = keyed.execute_fenced(&SystemClock, b"lost/1", &fp, retry, |token| {
        runs.fetch_add(1, Ordering::SeqCst);
        // The token is the claim the key holds (its revision).
        match other.get(b"lost/1", unix_ms_now()).unwrap().unwrap().state {
            KeyState::Claimed { token: current, .. } => assert_eq!(current, token),
            state => panic!("{state:?}"),
        }
        Execution::once(Ok(()))
    });
    assert!(
        fired.load(Ordering::SeqCst),
        "the claim's answer was never lost"
    );
    assert!(proxies.dropped_bytes() > 0);
    execution.result.unwrap();
    assert_eq!(execution.retries, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(backup_coordinator::metrics::store().unknown_outcomes.get() > unknown_before);
    // Not blocked: the next call of the key replays, on this host and another.
    let again = keyed.execute_fenced(&SystemClock, b"lost/1", &fp, once, |_| panic!("ran twice"));
    again.result.unwrap();
    assert_eq!(
        other.claim(b"lost/1", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
}

/// (b) Host A, cut off (blackholed) 1 s into its claim, sees it lost (check_claim:
/// LEASE_LOST) before etcd expires it; host B takes the key over after the lease with a
/// greater token; A's fenced operation, succeeding after that, is LEASE_LOST.
#[test]
fn etcd_a_host_cut_off_loses_its_claim_before_another_takes_it_over() {
    let cluster = Cluster::start(3);
    let proxies = HostProxies::start(&cluster.endpoints());
    let lease = Duration::from_secs(3);
    let a_store = idempotency(
        client(proxies.endpoints(), Duration::from_millis(500)),
        lease,
    );
    let a = Keyed::new(a_store, Arc::new(SystemClock), lease).unwrap();
    let b = idempotency(client(cluster.endpoints(), Duration::from_secs(5)), lease);
    let fp = fingerprint(b"cut off");
    let key = b"cut/1";
    let execution = a.execute_fenced(&SystemClock, key, &fp, once, |token| {
        a.check_claim(&SystemClock, key, token).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        proxies.set_mode(Mode::Blackhole);
        let cut = Instant::now();
        loop {
            match a.check_claim(&SystemClock, key, token) {
                Err(f) if f.code() == ErrorCode::LeaseLost.raw() => break,
                _ => {
                    assert!(cut.elapsed() < Duration::from_secs(5), "never lost");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let lost_after = cut.elapsed();
        // etcd still holds A's claim: lost here before it could lapse there.
        assert_eq!(
            b.claim(key, &fp, unix_ms_now()).unwrap(),
            Claim::InProgress,
            "lost {lost_after:?} after the cut, after etcd expired it"
        );
        let start = Instant::now();
        let taken = loop {
            match b.claim(key, &fp, unix_ms_now()).unwrap() {
                Claim::Acquired { token, .. } => break token,
                Claim::InProgress if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                other => panic!("{other:?}"),
            }
        };
        assert!(taken > token, "{taken:?} after {token:?}");
        // A's operation succeeds now, late; the cut heals so that its completion is
        // judged (not recorded over B's claim).
        proxies.set_mode(Mode::Pass);
        Execution::once(Ok(()))
    });
    let failure = execution.result.unwrap_err();
    assert_eq!(failure.code(), ErrorCode::LeaseLost.raw(), "{failure:?}");
    assert!(matches!(
        b.get(key, unix_ms_now()).unwrap().unwrap().state,
        KeyState::Claimed { token, .. } if token > ClaimToken(0)
    ));
}

/// (c) The run-claim txn of begin_run is applied, its answer lost, the host cut off: the
/// retry of that call (the same run id) finds the claim as its own, not IN_PROGRESS.
#[test]
fn etcd_a_run_claim_whose_answer_was_lost_is_the_calls_own_on_retry() {
    let cluster = Cluster::start(3);
    let proxies = HostProxies::start(&cluster.endpoints());
    let lease = Duration::from_secs(30);
    let a = EtcdLogRecords::new(client(proxies.endpoints(), Duration::from_secs(1)), lease);
    let b = EtcdLogRecords::new(client(cluster.endpoints(), Duration::from_secs(5)), lease);
    let fired = proxies.lose_the_answer_to(b"log-run/", Duration::from_millis(300));
    let run = ClaimId::new();
    let failure = a
        .begin_run_as("task-x", SubCommand::Start, run)
        .err()
        .unwrap();
    assert!(fired.load(Ordering::SeqCst), "{failure:?}");
    assert!(
        [ErrorCode::Network.raw(), ErrorCode::ConnectionLost.raw()].contains(&failure.code()),
        "{failure:?}"
    );
    proxies.set_mode(Mode::Pass);
    // The lost claim stands (its cleanup got nowhere either): B waits, A's retry has it.
    assert_eq!(
        b.begin_run("task-x", SubCommand::Start)
            .err()
            .unwrap()
            .code(),
        ErrorCode::InProgress.raw()
    );
    let claim = a.begin_run_as("task-x", SubCommand::Start, run).unwrap();
    claim.save(&Sequence::default()).unwrap();
    assert_eq!(
        b.begin_run("task-x", SubCommand::Start)
            .err()
            .unwrap()
            .code(),
        ErrorCode::InProgress.raw()
    );
    drop(claim);
    drop(b.begin_run("task-x", SubCommand::Start).unwrap());
}

/// (c) With a lease of 3 s, host A's run claim survives a 2 s blackhole (renewals retried
/// at once after a failure, not a whole period later): host B's begin_run never succeeds
/// while A's run goes on, and A's saves still land afterwards.
#[test]
fn etcd_a_log_backup_run_survives_an_outage_shorter_than_its_lease() {
    let cluster = Cluster::start(3);
    let proxies = Arc::new(HostProxies::start(&cluster.endpoints()));
    let lease = Duration::from_secs(3);
    let a = EtcdLogRecords::new(
        client(proxies.endpoints(), Duration::from_millis(200)),
        lease,
    );
    let b = EtcdLogRecords::new(client(cluster.endpoints(), Duration::from_secs(5)), lease);
    let run = a.begin_run("task-y", SubCommand::Start).unwrap();
    let t0 = Instant::now();
    // Cut from 1.6 s to 3.6 s: the renewal due at 2 s fails, and (before) the next one, a
    // period after that failure, fell in the cut too, so the lease (renewed at 1 s) ran out
    // at 4 s.
    let outage = {
        let proxies = proxies.clone();
        std::thread::spawn(move || {
            std::thread::sleep(
                (t0 + Duration::from_millis(1600)).saturating_duration_since(Instant::now()),
            );
            proxies.set_mode(Mode::Blackhole);
            std::thread::sleep(
                (t0 + Duration::from_millis(3600)).saturating_duration_since(Instant::now()),
            );
            proxies.set_mode(Mode::Pass);
        })
    };
    while t0.elapsed() < Duration::from_millis(6500) {
        match b.begin_run("task-y", SubCommand::Start) {
            Err(f) if f.code() == ErrorCode::InProgress.raw() => {}
            Err(f) => panic!("{f:?}"),
            Ok(_) => panic!(
                "a second host ran the command {:?} into the first one's run",
                t0.elapsed()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    outage.join().unwrap();
    run.save(&Sequence::default()).unwrap();
    drop(run);
    drop(b.begin_run("task-y", SubCommand::Start).unwrap());
}
