//! The state store on a real 3-member etcd cluster (C_API §9): two store instances play two
//! hosts. Claims, replays, conflicts and takeovers across hosts; the stalled owner fenced;
//! the cluster down (fail closed) and back; keys kept under the prefix; auth and TLS.

#[path = "common/etcd.rs"]
mod etcd_cluster;

use backup_coordinator::clock::unix_ms_now;
use backup_coordinator::config::Secret;
use backup_coordinator::error::ErrorCode;
use backup_coordinator::etcd::idempotency::EtcdIdempotencyStore;
use backup_coordinator::etcd::{EtcdClient, EtcdSettings};
use backup_coordinator::idempotency::{
    fingerprint, Claim, ClaimId, ClaimToken, Completion, Forgotten, IdempotencyStore, KeyState,
};
use etcd_cluster::Cluster;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PREFIX: &str = "/taosx/test/";

fn settings(cluster: &Cluster) -> EtcdSettings {
    let mut s = EtcdSettings::new(cluster.endpoints());
    s.prefix = PREFIX.into();
    s.timeout = Duration::from_secs(5);
    s
}

/// One "host": its own client (runtime, connections) and store.
fn host(settings: &EtcdSettings, lease: Duration, ttl: Duration) -> EtcdIdempotencyStore {
    let client = Arc::new(EtcdClient::new(settings).unwrap());
    EtcdIdempotencyStore::new(client, lease, ttl)
}

fn acquired(claim: Claim) -> ClaimToken {
    match claim {
        Claim::Acquired { token, .. } => token,
        other => panic!("expected the key to be acquired, got {other:?}"),
    }
}

#[test]
fn etcd_claims_replays_conflicts_and_takeovers_across_hosts() {
    let cluster = Cluster::start(3);
    let s = settings(&cluster);
    let lease = Duration::from_secs(2);
    let ttl = Duration::from_secs(3600);
    let a = host(&s, lease, ttl);
    let b = host(&s, lease, ttl);
    let (fp, other) = (fingerprint(b"block 1"), fingerprint(b"block 1, changed"));

    // A claims; B sees it in progress, or a conflict with another payload.
    let token_a = acquired(a.claim(b"job/1", &fp, unix_ms_now()).unwrap());
    assert_eq!(
        b.claim(b"job/1", &fp, unix_ms_now()).unwrap(),
        Claim::InProgress
    );
    assert_eq!(
        b.claim(b"job/1", &other, unix_ms_now()).unwrap(),
        Claim::Conflict
    );
    assert_eq!(
        b.forget(b"job/1", unix_ms_now()).unwrap(),
        Forgotten::InProgress
    );
    let record = b.get(b"job/1", unix_ms_now()).unwrap().expect("claimed");
    assert!(matches!(record.state, KeyState::Claimed { token, .. } if token == token_a));

    // A completes: B replays the result; another payload conflicts.
    assert_eq!(
        a.complete(b"job/1", token_a, &fp, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );
    assert_eq!(
        b.claim(b"job/1", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
    assert_eq!(
        b.claim(b"job/1", &other, unix_ms_now()).unwrap(),
        Claim::Conflict
    );
    // A late second completion of the same claim changes nothing.
    assert_eq!(
        a.complete(b"job/1", token_a, &fp, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );

    // Forget on B: the key runs again, anywhere.
    assert_eq!(
        b.forget(b"job/1", unix_ms_now()).unwrap(),
        Forgotten::Removed
    );
    assert_eq!(
        b.forget(b"job/1", unix_ms_now()).unwrap(),
        Forgotten::Absent
    );
    let token_b = acquired(b.claim(b"job/1", &fp, unix_ms_now()).unwrap());
    assert_ne!(token_b, token_a, "every claim has its own token");

    // A release frees the key for the other host; a released key has no record.
    b.release(b"job/1", token_b).unwrap();
    assert_eq!(b.get(b"job/1", unix_ms_now()).unwrap(), None);
    let token_a2 = acquired(a.claim(b"job/1", &fp, unix_ms_now()).unwrap());

    // A host that dies stops renewing: its claim vanishes with its lease, B takes over.
    drop(a);
    let start = Instant::now();
    let token_b2 = loop {
        match b.claim(b"job/1", &fp, unix_ms_now()).unwrap() {
            Claim::Acquired { token, .. } => break token,
            Claim::InProgress => {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "the dead host's claim never expired"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "taken over before the lease ran out"
    );
    assert_ne!(token_b2, token_a2);
    // Renewing keeps a live owner's claim however long it runs.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(700));
        b.renew(&[(b"job/1".to_vec(), token_b2)], unix_ms_now())
            .unwrap();
    }
    let c = host(&s, lease, ttl);
    assert_eq!(
        c.claim(b"job/1", &fp, unix_ms_now()).unwrap(),
        Claim::InProgress
    );
}

#[test]
fn etcd_stalled_owner_is_fenced() {
    let cluster = Cluster::start(3);
    let s = settings(&cluster);
    // A's lease is short (it is the one that stalls); the others outlive the test.
    let a = host(&s, Duration::from_secs(1), Duration::from_secs(3600));
    let b = host(&s, Duration::from_secs(30), Duration::from_secs(3600));
    let c = host(&s, Duration::from_secs(30), Duration::from_secs(3600));
    let fp = fingerprint(b"payload");

    // A claims and stalls (renews nothing, its session neither); its session lapses, and
    // its claim with it; B takes over.
    let stalled = acquired(a.claim(b"k", &fp, unix_ms_now()).unwrap());
    a.stall_session(true);
    let start = Instant::now();
    let taker = loop {
        match b.claim(b"k", &fp, unix_ms_now()).unwrap() {
            Claim::Acquired { token, .. } => break token,
            Claim::InProgress if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!("{other:?}"),
        }
    };
    // A resumes: its renewal, release and completion never touch B's claim.
    a.renew(&[(b"k".to_vec(), stalled)], unix_ms_now()).unwrap();
    a.release(b"k", stalled).unwrap();
    assert_eq!(
        c.claim(b"k", &fp, unix_ms_now()).unwrap(),
        Claim::InProgress,
        "a third caller waits for B"
    );
    assert_eq!(
        a.complete(b"k", stalled, &fp, 0, unix_ms_now()).unwrap(),
        Completion::Superseded
    );
    let record = c.get(b"k", unix_ms_now()).unwrap().unwrap();
    assert!(matches!(record.state, KeyState::Claimed { token, .. } if token == taker));
    // B completes; A's late completion does not overwrite it either.
    assert_eq!(
        b.complete(b"k", taker, &fp, 0, unix_ms_now()).unwrap(),
        Completion::Recorded
    );
    assert_eq!(
        a.complete(b"k", stalled, &fp, 0, unix_ms_now()).unwrap(),
        Completion::Superseded
    );
    assert_eq!(
        c.claim(b"k", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );

    // A stalled owner whose key is free by then records its completion: the same payload
    // replays.
    let lonely = acquired(a.claim(b"free", &fp, unix_ms_now()).unwrap());
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        b.get(b"free", unix_ms_now()).unwrap(),
        None,
        "the lapsed claim is gone"
    );
    assert_eq!(
        a.complete(b"free", lonely, &fp, 0, unix_ms_now()).unwrap(),
        Completion::Recorded
    );
    assert_eq!(
        b.claim(b"free", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
}

#[test]
fn etcd_all_members_down_fails_closed_then_work_resumes() {
    let mut cluster = Cluster::start(3);
    let mut s = settings(&cluster);
    s.timeout = Duration::from_secs(3);
    let store = host(&s, Duration::from_secs(5), Duration::from_secs(3600));
    let fp = fingerprint(b"x");
    let token = acquired(store.claim(b"before", &fp, unix_ms_now()).unwrap());
    assert_eq!(
        store
            .complete(b"before", token, &fp, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );

    cluster.kill_all();
    // One call, retried as the plugin's policy retries it (one claim identity): an attempt
    // sent while no quorum answers may still apply once the cluster is back, and is then
    // the call's own.
    let during = ClaimId::new();
    let started = Instant::now();
    let failure = store
        .claim_as(b"during", &fp, unix_ms_now(), during)
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        failure.code() == ErrorCode::Network.raw()
            || failure.code() == ErrorCode::ConnectionLost.raw(),
        "{failure:?}"
    );
    assert!(failure.detail().contains("etcd"), "{}", failure.detail());
    assert!(
        took < Duration::from_secs(8),
        "gave up after {took:?}, etcd_timeout is 3s"
    );
    // No quorum: one member back is not enough.
    cluster.restart(0);
    std::thread::sleep(Duration::from_millis(500));
    let failure = store
        .claim_as(b"during", &fp, unix_ms_now(), during)
        .unwrap_err();
    assert!(
        failure.code() == ErrorCode::Network.raw()
            || failure.code() == ErrorCode::ConnectionLost.raw(),
        "{failure:?}"
    );

    cluster.restart_all();
    // The store reconnects by itself: what was recorded before is there, new work goes on.
    assert_eq!(
        store.claim(b"before", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
    let token = acquired(
        store
            .claim_as(b"during", &fp, unix_ms_now(), during)
            .unwrap(),
    );
    assert_eq!(
        store
            .complete(b"during", token, &fp, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );
}

#[test]
fn etcd_init_needs_no_cluster_and_keys_stay_under_the_prefix() {
    // Nothing listens there: creating the store connects nothing.
    let mut nowhere = EtcdSettings::new(vec!["http://127.0.0.1:1".into()]);
    nowhere.timeout = Duration::from_millis(500);
    let store = host(&nowhere, Duration::from_secs(5), Duration::from_secs(60));
    let failure = store
        .claim(b"k", &fingerprint(b""), unix_ms_now())
        .unwrap_err();
    assert_eq!(failure.code(), ErrorCode::Network.raw(), "{failure:?}");

    let cluster = Cluster::start(3);
    let store = host(
        &settings(&cluster),
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let hostile = b"../../\x00\xff/x\n".to_vec();
    let token = acquired(
        store
            .claim(&hostile, &fingerprint(b""), unix_ms_now())
            .unwrap(),
    );
    store
        .complete(&hostile, token, &fingerprint(b""), 0, unix_ms_now())
        .unwrap();
    let all = cluster.etcdctl(&["get", "", "--prefix", "--keys-only"]);
    let keys: Vec<&str> = all.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys, vec![format!("{PREFIX}k/../../%00%FF/x%0A")], "{all}");
}

#[test]
fn etcd_completions_expire_and_leave_no_key() {
    let cluster = Cluster::start(3);
    let ttl = Duration::from_secs(2);
    let store = host(&settings(&cluster), Duration::from_secs(5), ttl);
    let fp = fingerprint(b"p");
    for i in 0..20 {
        let key = format!("short/{i}");
        let token = acquired(store.claim(key.as_bytes(), &fp, unix_ms_now()).unwrap());
        store
            .complete(key.as_bytes(), token, &fp, 0, unix_ms_now())
            .unwrap();
    }
    assert_eq!(
        store.claim(b"short/0", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
    // A completion keeps its expiry in whole seconds, rounded up.
    std::thread::sleep(ttl + Duration::from_millis(1200));
    // Expired: a fresh claim, whatever the payload.
    acquired(
        store
            .claim(b"short/1", &fingerprint(b"other"), unix_ms_now())
            .unwrap(),
    );
    // etcd deletes the rest with their lease (TTL plus a slack of at most 3s here).
    let start = Instant::now();
    loop {
        let left = cluster.etcdctl(&["get", &format!("{PREFIX}k/"), "--prefix", "--keys-only"]);
        let count = left.lines().filter(|l| !l.is_empty()).count();
        // short/1 is claimed again (its lease is 5s) and may outlive the others.
        if count <= 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "expired completions still in etcd: {left}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn etcd_auth_right_and_wrong_password() {
    let mut cluster = Cluster::start(3);
    cluster.enable_auth("backup", "right-pw", PREFIX);
    let mut good = settings(&cluster);
    good.user = Some("backup".into());
    good.password = Some(Secret::new("right-pw"));
    let store = host(&good, Duration::from_secs(5), Duration::from_secs(60));
    let fp = fingerprint(b"a");
    let token = acquired(store.claim(b"auth", &fp, unix_ms_now()).unwrap());
    assert_eq!(
        store
            .complete(b"auth", token, &fp, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );
    store.release(b"auth", token).unwrap();

    let mut bad = good.clone();
    bad.password = Some(Secret::new("wrong-pw-7731"));
    let store = host(&bad, Duration::from_secs(5), Duration::from_secs(60));
    let started = Instant::now();
    let failure = store.claim(b"auth", &fp, unix_ms_now()).unwrap_err();
    assert_eq!(
        failure.code(),
        ErrorCode::PermissionDenied.raw(),
        "{failure:?}"
    );
    assert!(
        failure.detail().contains("etcd_user"),
        "{}",
        failure.detail()
    );
    assert!(
        !failure.detail().contains("wrong-pw-7731"),
        "the password leaked: {}",
        failure.detail()
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a wrong password is not retried"
    );

    // Outside the role's prefix: denied as well.
    let mut elsewhere = good.clone();
    elsewhere.prefix = "/other/".into();
    let store = host(&elsewhere, Duration::from_secs(5), Duration::from_secs(60));
    let failure = store.claim(b"auth", &fp, unix_ms_now()).unwrap_err();
    assert_eq!(
        failure.code(),
        ErrorCode::PermissionDenied.raw(),
        "{failure:?}"
    );
}

#[test]
fn etcd_tls_with_client_certificates() {
    let cluster = Cluster::start_tls(3);
    let tls = cluster.tls().unwrap().clone();
    let mut s = settings(&cluster);
    assert!(s.endpoints[0].starts_with("https://"));
    s.ca_file = Some(tls.ca.clone());
    s.cert_file = Some(tls.client_cert.clone());
    s.key_file = Some(tls.client_key.clone());
    let store = host(&s, Duration::from_secs(5), Duration::from_secs(60));
    let fp = fingerprint(b"tls");
    let token = acquired(store.claim(b"tls", &fp, unix_ms_now()).unwrap());
    assert_eq!(
        store
            .complete(b"tls", token, &fp, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );
    assert_eq!(
        store.claim(b"tls", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );

    // Without a client certificate the cluster refuses the connection: a network failure.
    let mut anonymous = s.clone();
    anonymous.cert_file = None;
    anonymous.key_file = None;
    anonymous.timeout = Duration::from_secs(1);
    let store = host(&anonymous, Duration::from_secs(5), Duration::from_secs(60));
    let failure = store.claim(b"tls", &fp, unix_ms_now()).unwrap_err();
    assert!(
        failure.code() == ErrorCode::Network.raw()
            || failure.code() == ErrorCode::ConnectionLost.raw(),
        "{failure:?}"
    );
    // A missing file is named at once.
    let mut missing = s.clone();
    missing.ca_file = Some("/nonexistent/ca.pem".into());
    let failure = EtcdClient::new(&missing)
        .err()
        .expect("a missing CA file is an error");
    assert_eq!(failure.code(), ErrorCode::InvalidParam.raw());
    assert!(
        failure.detail().contains("etcd_ca_file")
            && failure.detail().contains("/nonexistent/ca.pem"),
        "{}",
        failure.detail()
    );
}

/// A TCP proxy in front of one member that, once armed, forwards the next request but
/// swallows every answer for 500ms and then drops the connection: the client's request was
/// applied, and it never learns so.
struct LossyProxy {
    url: String,
    armed: Arc<std::sync::atomic::AtomicBool>,
    swallowed: Arc<std::sync::atomic::AtomicUsize>,
}

impl LossyProxy {
    fn start(upstream: &str) -> LossyProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let armed = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicUsize::new(0));
        let (armed2, swallowed2) = (armed.clone(), swallowed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                });
                let (mut s_in, mut c_out) = (server, client);
                let (armed, swallowed) = (armed2.clone(), swallowed2.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    let mut cut_at: Option<Instant> = None;
                    loop {
                        if cut_at.is_none() && armed.swap(false, Ordering::SeqCst) {
                            cut_at = Some(Instant::now());
                        }
                        if cut_at.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
                            let _ = c_out.shutdown(Shutdown::Both);
                            let _ = s_in.shutdown(Shutdown::Both);
                            return;
                        }
                        s_in.set_read_timeout(Some(Duration::from_millis(20)))
                            .unwrap();
                        match s_in.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) if cut_at.is_some() => {
                                swallowed.fetch_add(n, Ordering::SeqCst);
                            }
                            Ok(n) => {
                                if c_out.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        LossyProxy {
            url,
            armed,
            swallowed,
        }
    }
}

#[test]
fn etcd_a_lost_answer_is_resolved_by_reading_the_key_back() {
    use std::sync::atomic::Ordering;
    let cluster = Cluster::start(3);
    let proxy = LossyProxy::start(&cluster.endpoints()[0]);
    let mut s = settings(&cluster);
    s.endpoints = vec![proxy.url.clone()];
    s.timeout = Duration::from_secs(4);
    let store = host(&s, Duration::from_secs(30), Duration::from_secs(3600));
    let fp = fingerprint(b"lost answer");
    // The completion lease is granted by the first completion: later ones are one request.
    let warm = acquired(store.claim(b"warm", &fp, unix_ms_now()).unwrap());
    store
        .complete(b"warm", warm, &fp, 0, unix_ms_now())
        .unwrap();
    let token = acquired(store.claim(b"lost", &fp, unix_ms_now()).unwrap());

    // The completion is applied, its answer lost with the connection. Retried, its compare
    // (the key still bound to the claim's lease) fails: only the claim's own token in the
    // value read back tells that the completion is ours, not another caller's.
    proxy.armed.store(true, Ordering::SeqCst);
    let completion = store
        .complete(b"lost", token, &fp, 0, unix_ms_now())
        .unwrap();
    assert!(
        proxy.swallowed.load(Ordering::SeqCst) >= 60,
        "the answer was not swallowed ({} bytes)",
        proxy.swallowed.load(Ordering::SeqCst)
    );
    assert_eq!(completion, Completion::Recorded);
    // Written once: the claim's put and the completion's put.
    let fields = cluster.etcdctl(&["get", &format!("{PREFIX}k/lost"), "-w", "fields"]);
    assert!(fields.contains("\"Version\" : 2"), "{fields}");
    assert_eq!(
        store.claim(b"lost", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
}

#[test]
fn etcd_database_space_exceeded_is_disk_full() {
    // A 2 MiB quota, filled by another client until etcd raises its NOSPACE alarm.
    let cluster = Cluster::start_with_args(3, &["--quota-backend-bytes", "2097152"]);
    let store = host(
        &settings(&cluster),
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let fp = fingerprint(b"full");
    let token = acquired(store.claim(b"before", &fp, unix_ms_now()).unwrap());
    cluster.fill_past_quota(512 * 1024, |i| format!("/filler/{i}"));
    let started = Instant::now();
    let failure = store.claim(b"after", &fp, unix_ms_now()).unwrap_err();
    assert_eq!(failure.code(), ErrorCode::DiskFull.raw(), "{failure:?}");
    assert!(
        failure.detail().contains("database space"),
        "{}",
        failure.detail()
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a full cluster is not retried"
    );
    // A completion too (its claim was recorded before the cluster filled up).
    let failure = store
        .complete(b"before", token, &fp, 0, unix_ms_now())
        .unwrap_err();
    assert_eq!(failure.code(), ErrorCode::DiskFull.raw(), "{failure:?}");
}

/// A store ("host") that talks to one member only.
fn host_on(cluster: &Cluster, member: usize, lease: Duration) -> EtcdIdempotencyStore {
    let mut s = settings(cluster);
    s.endpoints = vec![cluster.members[member].client_url.clone()];
    host(&s, lease, Duration::from_secs(3600))
}

fn wait_acquired(store: &EtcdIdempotencyStore, key: &[u8], within: Duration) -> ClaimToken {
    let fp = fingerprint(b"fenced");
    let start = Instant::now();
    loop {
        match store.claim(key, &fp, unix_ms_now()).unwrap() {
            Claim::Acquired { token, .. } => return token,
            Claim::InProgress if start.elapsed() < within => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!("{other:?} after {:?}", start.elapsed()),
        }
    }
}

/// docs/C_API.md §8.1: every claim of a key gets a token greater than every earlier
/// claim's, whatever happened between and whichever member it went through.
#[test]
fn etcd_tokens_of_successive_claims_strictly_increase() {
    let cluster = Cluster::start(3);
    let hosts: Vec<_> = (0..3)
        .map(|m| host_on(&cluster, m, Duration::from_secs(2)))
        .collect();
    let fp = fingerprint(b"fenced");
    let key = b"fenced/1";
    let mut tokens = Vec::new();
    let now = unix_ms_now;
    // Through m0, released.
    let t = wait_acquired(&hosts[0], key, Duration::ZERO);
    tokens.push(t);
    hosts[0].release(key, t).unwrap();
    // Through m1, completed, forgotten through m2.
    let t = wait_acquired(&hosts[1], key, Duration::ZERO);
    tokens.push(t);
    assert_eq!(
        hosts[1].complete(key, t, &fp, 0, now()).unwrap(),
        Completion::Recorded
    );
    match hosts[2].get(key, now()).unwrap().unwrap().state {
        KeyState::Completed { token, .. } => assert_eq!(token, t, "the completing claim's"),
        other => panic!("{other:?}"),
    }
    assert_eq!(hosts[2].forget(key, now()).unwrap(), Forgotten::Removed);
    // Through m2, never renewed (its host stalls): taken over through m0 once its session
    // ran out.
    hosts[2].stall_session(true);
    let t = wait_acquired(&hosts[2], key, Duration::ZERO);
    tokens.push(t);
    let t = wait_acquired(&hosts[0], key, Duration::from_secs(10));
    tokens.push(t);
    // Read back through every member: the token is the claim's revision.
    for h in &hosts {
        match h.get(key, now()).unwrap().unwrap().state {
            KeyState::Claimed { token, .. } => assert_eq!(token, t),
            other => panic!("{other:?}"),
        }
    }
    // Renewals keep it (and its token).
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(hosts[0].renew(&[(key.to_vec(), t)], now()).unwrap(), []);
    }
    hosts[0].release(key, t).unwrap();
    // A handle opened afterwards (a restart) continues above.
    let fresh = host_on(&cluster, 1, Duration::from_secs(2));
    tokens.push(wait_acquired(&fresh, key, Duration::ZERO));
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]) && tokens[0].0 > 0,
        "{tokens:?}"
    );
}

/// Two hosts race for one key, round after round: one claim at a time wins, and each
/// winner's token is greater than the last.
#[test]
fn etcd_two_hosts_racing_on_one_key() {
    let cluster = Cluster::start(3);
    let a = Arc::new(host_on(&cluster, 0, Duration::from_secs(5)));
    let b = Arc::new(host_on(&cluster, 2, Duration::from_secs(5)));
    let fp = fingerprint(b"race");
    let mut last = ClaimToken(0);
    for round in 0..20 {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let race = |store: Arc<EtcdIdempotencyStore>, barrier: Arc<std::sync::Barrier>| {
            std::thread::spawn(move || {
                barrier.wait();
                store.claim(b"race", &fp, unix_ms_now()).unwrap()
            })
        };
        let (ta, tb) = (race(a.clone(), barrier.clone()), race(b.clone(), barrier));
        let (ca, cb) = (ta.join().unwrap(), tb.join().unwrap());
        let (winner, token) = match (ca, cb) {
            (Claim::Acquired { token, .. }, Claim::InProgress) => (&a, token),
            (Claim::InProgress, Claim::Acquired { token, .. }) => (&b, token),
            other => panic!("round {round}: {other:?}"),
        };
        assert!(token > last, "round {round}: {token:?} after {last:?}");
        last = token;
        winner.release(b"race", token).unwrap();
    }
}

/// renew answers the claims that are no longer current: released, lapsed with the host's
/// session, or another handle's; the live ones are renewed by one keep-alive of the session.
#[test]
fn etcd_renew_returns_the_lapsed_claims() {
    let cluster = Cluster::start(3);
    let s = settings(&cluster);
    // Whole seconds: etcd reports a lease's time to live in seconds.
    let a = host(&s, Duration::from_secs(2), Duration::from_secs(3600));
    let b = host(&s, Duration::from_secs(2), Duration::from_secs(3600));
    let fp = fingerprint(b"renew");
    let now = unix_ms_now;
    let live = acquired(a.claim(b"live", &fp, now()).unwrap());
    let released = acquired(a.claim(b"released", &fp, now()).unwrap());
    let other = acquired(a.claim(b"other", &fp, now()).unwrap());
    a.release(b"released", released).unwrap();
    let claims = || {
        vec![
            (b"live".to_vec(), live),
            (b"released".to_vec(), released),
            (b"other".to_vec(), other),
        ]
    };
    let gone = |key: &[u8], token| (key.to_vec(), token);
    assert_eq!(
        a.renew(&claims(), now()).unwrap(),
        [gone(b"released", released)]
    );
    // A stalls, renewing nothing in the background: renewals by calls keep its session
    // (and every claim bound to it) for 2 leases.
    a.stall_session(true);
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            a.renew(&claims(), now()).unwrap(),
            [gone(b"released", released)]
        );
    }
    assert_eq!(b.claim(b"other", &fp, now()).unwrap(), Claim::InProgress);
    // Then nothing renews it: the session lapses, and every claim of A with it.
    let start = Instant::now();
    let taker = loop {
        match b.claim(b"other", &fp, now()).unwrap() {
            Claim::Acquired { token, .. } => break token,
            Claim::InProgress if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(taker > other);
    assert_eq!(
        b.get(b"live", now()).unwrap(),
        None,
        "lapsed with the session"
    );
    assert_eq!(
        a.renew(&claims(), now()).unwrap(),
        [
            gone(b"released", released),
            gone(b"live", live),
            gone(b"other", other)
        ]
    );
    // B's claim is not A's to renew.
    assert_eq!(
        a.renew(&[(b"other".to_vec(), taker)], now()).unwrap(),
        [gone(b"other", taker)]
    );
    assert_eq!(b.renew(&[(b"other".to_vec(), taker)], now()).unwrap(), []);
    // A claims again under a new session, kept by its resumed keep-alive.
    a.stall_session(false);
    let again = acquired(a.claim(b"live", &fp, now()).unwrap());
    std::thread::sleep(Duration::from_millis(3000));
    assert!(matches!(
        b.get(b"live", now()).unwrap().unwrap().state,
        KeyState::Claimed { token, .. } if token == again
    ));
}

/// A claim made while the session is kept alive costs no keep-alive of its own: it is
/// vouched for by the session's last acknowledged renewal, and the holder's view counts
/// from that renewal's sending. Once that renewal is older than the session's keep-alive
/// interval (a sixth of the lease: the host stalled), a claim sends a keep-alive alongside
/// its transaction.
#[test]
fn etcd_a_claim_is_vouched_for_by_the_sessions_last_renewal_while_it_is_kept_alive() {
    let cluster = Cluster::start(3);
    let s = settings(&cluster);
    // The session is kept alive every second.
    let a = host(&s, Duration::from_secs(6), Duration::from_secs(3600));
    let fp = fingerprint(b"vouched");
    let now = unix_ms_now;
    let vouched_ago = |key: &[u8], token| a.vouched_ago(key, token).expect("held");
    // The first claim grants the session: vouched for by the grant, sent with it.
    let first = acquired(a.claim(b"first", &fp, now()).unwrap());
    assert!(vouched_ago(b"first", first) < Duration::from_millis(500));
    // 0.6 s later, before the session's next keep-alive: the grant again.
    std::thread::sleep(Duration::from_millis(600));
    let second = acquired(a.claim(b"second", &fp, now()).unwrap());
    let ago = vouched_ago(b"second", second);
    assert!(
        ago >= Duration::from_millis(600) && ago < Duration::from_millis(1000),
        "{ago:?}"
    );
    // The host stalls: its last renewal grows older than a period, so a claim vouches for
    // itself with a keep-alive sent alongside.
    a.stall_session(true);
    std::thread::sleep(Duration::from_millis(1200));
    let third = acquired(a.claim(b"third", &fp, now()).unwrap());
    assert!(vouched_ago(b"third", third) < Duration::from_millis(500));
    // 1.8 s after the grant, within its 6 s: A's claims still hold their keys.
    let b = host(&s, Duration::from_secs(6), Duration::from_secs(3600));
    assert_eq!(b.claim(b"second", &fp, now()).unwrap(), Claim::InProgress);
}

/// One session lease per host, however many claims it holds; claims and run claims of one
/// instance share it.
#[test]
fn etcd_one_session_lease_per_host() {
    let cluster = Cluster::start(3);
    let s = settings(&cluster);
    let client = Arc::new(EtcdClient::new(&s).unwrap());
    let a = EtcdIdempotencyStore::new(
        client.clone(),
        Duration::from_secs(30),
        Duration::from_secs(3600),
    );
    let b = host(&s, Duration::from_secs(30), Duration::from_secs(3600));
    let fp = fingerprint(b"session");
    let leases = || {
        // "found N leases", then their IDs.
        let out = cluster.etcdctl(&["lease", "list"]);
        let first = out.lines().next().unwrap_or_default().to_string();
        first
            .split(' ')
            .nth(1)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("{out}"))
    };
    let before = leases();
    let mut tokens = Vec::new();
    for i in 0..50 {
        let key = format!("many/{i}");
        tokens.push((
            key.clone(),
            acquired(a.claim(key.as_bytes(), &fp, unix_ms_now()).unwrap()),
        ));
        acquired(
            b.claim(format!("more/{i}").as_bytes(), &fp, unix_ms_now())
                .unwrap(),
        );
    }
    let runs =
        backup_coordinator::etcd::log_records::EtcdLogRecords::new(client, Duration::from_secs(30));
    let run = backup_coordinator::log_backup::records::LogRecordStore::begin_run(
        &runs,
        "task-1",
        backup_coordinator::log_backup::SubCommand::Start,
    )
    .unwrap();
    assert_eq!(leases() - before, 2, "one session per host");
    drop(run);
    for (key, token) in &tokens[..10] {
        a.release(key.as_bytes(), *token).unwrap();
    }
    for (key, token) in &tokens[10..] {
        assert_eq!(
            a.complete(key.as_bytes(), *token, &fp, 0, unix_ms_now())
                .unwrap(),
            Completion::Recorded
        );
    }
    // The completions' shared lease is the third.
    assert_eq!(leases() - before, 3);
}

/// A retry of one call (the same ClaimId) finds the claim its earlier attempt wrote and
/// acquires it with the same token: no second lease, no IN_PROGRESS for itself.
#[test]
fn etcd_a_retry_of_the_same_call_acquires_its_own_claim() {
    let cluster = Cluster::start(3);
    let s = settings(&cluster);
    let a = host(&s, Duration::from_secs(30), Duration::from_secs(3600));
    let b = host(&s, Duration::from_secs(30), Duration::from_secs(3600));
    let fp = fingerprint(b"retried");
    let id = ClaimId::new();
    let unknown = || backup_coordinator::metrics::store().unknown_outcomes.get();
    let before = unknown();
    let first = acquired(a.claim_as(b"retried", &fp, unix_ms_now(), id).unwrap());
    let again = acquired(a.claim_as(b"retried", &fp, unix_ms_now(), id).unwrap());
    assert_eq!(first, again);
    assert!(unknown() > before);
    // Another call (another identity), on this host or another, waits.
    assert_eq!(
        a.claim(b"retried", &fp, unix_ms_now()).unwrap(),
        Claim::InProgress
    );
    assert_eq!(
        b.claim(b"retried", &fp, unix_ms_now()).unwrap(),
        Claim::InProgress
    );
    assert_eq!(
        a.complete(b"retried", first, &fp, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );
    assert_eq!(
        b.claim(b"retried", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
}

/// `<prefix>i/<base64url key>`, where builds before the current layout kept a key.
fn old_name(key: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut name = format!("{PREFIX}i/").into_bytes();
    for chunk in key.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            name.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]);
        }
    }
    name
}

/// Keys written by the build before the current layout (under `<prefix>i/`, fixed-size
/// `c`/`d` records, written here byte for byte) still replay, conflict and keep a claim
/// off while they are live; an expired one is claimed over (and deleted with the claim);
/// forget reaches them. Once that space is empty, a new handle does not look there.
#[test]
fn etcd_keys_of_the_earlier_layout_still_replay_conflict_and_block_claims() {
    use etcd_client::{Client, PutOptions};
    let cluster = Cluster::start(3);
    let s = settings(&cluster);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime
        .block_on(Client::connect(cluster.endpoints(), None))
        .unwrap();
    let (fp, other) = (fingerprint(b"old"), fingerprint(b"other"));
    let now = unix_ms_now();
    let completion = |token: u64, result: i32, expires: u64| {
        [
            &[b'd'][..],
            &token.to_be_bytes(),
            &fp,
            &result.to_be_bytes(),
            &expires.to_be_bytes(),
        ]
        .concat()
    };
    let claim = [
        &[b'c'][..],
        &77u64.to_be_bytes(),
        &fp,
        &(now + 60_000).to_be_bytes(),
    ]
    .concat();
    let put = |key: &[u8], value: Vec<u8>, options: Option<PutOptions>| {
        runtime
            .block_on(client.clone().put(old_name(key), value, options))
            .unwrap();
    };
    let old_lease = runtime
        .block_on(client.clone().lease_grant(60, None))
        .unwrap()
        .id();
    put(b"done", completion(5, -6, now + 3_600_000), None);
    put(b"expired", completion(6, 0, now - 1), None);
    put(b"forgotten", completion(7, 0, now + 3_600_000), None);
    put(
        b"running",
        claim,
        Some(PutOptions::new().with_lease(old_lease)),
    );
    let old_exists = |key: &[u8]| {
        runtime
            .block_on(client.clone().get(old_name(key), None))
            .unwrap()
            .count()
            > 0
    };

    let a = host(&s, Duration::from_secs(5), Duration::from_secs(3600));
    // Completed under the old layout: replayed, a conflict with another payload.
    assert_eq!(
        a.claim(b"done", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: -6 }
    );
    assert_eq!(
        a.claim(b"done", &other, unix_ms_now()).unwrap(),
        Claim::Conflict
    );
    assert!(matches!(
        a.get(b"done", unix_ms_now()).unwrap().map(|r| r.state),
        Some(KeyState::Completed {
            token: ClaimToken(5),
            result: -6,
            ..
        })
    ));
    // Claimed by a host of the earlier build: in progress, never claimed here.
    assert_eq!(
        a.claim(b"running", &fp, unix_ms_now()).unwrap(),
        Claim::InProgress
    );
    assert_eq!(
        a.claim(b"running", &other, unix_ms_now()).unwrap(),
        Claim::Conflict
    );
    assert_eq!(
        a.forget(b"running", unix_ms_now()).unwrap(),
        Forgotten::InProgress
    );
    // Expired there: claimed here, the old record deleted by the claim.
    let token = acquired(a.claim(b"expired", &other, unix_ms_now()).unwrap());
    assert!(!old_exists(b"expired"));
    assert_eq!(
        a.complete(b"expired", token, &other, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );
    assert_eq!(
        a.claim(b"expired", &other, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
    // Forgotten there: it runs again.
    assert_eq!(
        a.forget(b"forgotten", unix_ms_now()).unwrap(),
        Forgotten::Removed
    );
    assert!(!old_exists(b"forgotten"));
    acquired(a.claim(b"forgotten", &fp, unix_ms_now()).unwrap());

    // The old host's claim ends, its completions go: a new handle finds the old space
    // empty and claims as if it never was.
    runtime
        .block_on(client.clone().lease_revoke(old_lease))
        .unwrap();
    runtime
        .block_on(client.clone().delete(old_name(b"done"), None))
        .unwrap();
    let b = host(&s, Duration::from_secs(5), Duration::from_secs(3600));
    acquired(b.claim(b"done", &fp, unix_ms_now()).unwrap());
    acquired(b.claim(b"running", &fp, unix_ms_now()).unwrap());
}

/// The cluster's current revision: each transaction that writes advances it by one,
/// however many keys it writes.
/// The claims and completions of one process's threads share transactions (C_API §8.1:
/// the claims of one transaction share its revision as their token), and each caller
/// still gets its own exact answer: every fresh key acquired and recorded, and of the
/// threads racing for one key, exactly one acquires it while the rest are told it is in
/// progress.
#[test]
fn etcd_concurrent_writes_of_one_process_share_transactions() {
    let cluster = Cluster::start(3);
    let store = Arc::new(host(
        &settings(&cluster),
        Duration::from_secs(30),
        Duration::from_secs(3600),
    ));
    // Connections, the session and the completions' lease, made before counting.
    let fp = fingerprint(b"warm");
    let token = acquired(store.claim(b"warm", &fp, unix_ms_now()).unwrap());
    store
        .complete(b"warm", token, &fp, 0, unix_ms_now())
        .unwrap();
    let (threads, keys) = (8, 40);
    let before = cluster.status_field("revision");
    let tokens: Vec<ClaimToken> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let store = &store;
                s.spawn(move || {
                    let mut tokens = Vec::new();
                    for i in 0..keys {
                        let key = format!("together/{t}/{i}");
                        let fp = fingerprint(key.as_bytes());
                        let token =
                            acquired(store.claim(key.as_bytes(), &fp, unix_ms_now()).unwrap());
                        let done = store.complete(key.as_bytes(), token, &fp, 0, unix_ms_now());
                        assert_eq!(done.unwrap(), Completion::Recorded, "{key}");
                        tokens.push(token);
                    }
                    tokens
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let writes = (threads * keys * 2) as u64;
    let transactions = cluster.status_field("revision") - before;
    let mut distinct = tokens.clone();
    distinct.sort();
    distinct.dedup();
    eprintln!(
        "{writes} writes in {transactions} transactions; {} claims, {} tokens",
        tokens.len(),
        distinct.len()
    );
    // Shared, with room for a loaded machine (measured here: about 0.2 per write).
    assert!(
        transactions * 2 <= writes,
        "{writes} writes took {transactions} transactions"
    );
    assert!(
        distinct.len() * 3 <= tokens.len() * 2,
        "{} claims got {} tokens",
        tokens.len(),
        distinct.len()
    );

    // Racing for one key within one process: its writes never share a transaction (and
    // the writes kept back for the next batch are each looked at once: an earlier combiner
    // spun forever on them).
    for round in 0..10 {
        let key = format!("contended/{round}");
        let fp = fingerprint(key.as_bytes());
        let barrier = std::sync::Barrier::new(4);
        let claims: Vec<Claim> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        store.claim(key.as_bytes(), &fp, unix_ms_now()).unwrap()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let won = claims
            .iter()
            .filter(|c| matches!(c, Claim::Acquired { .. }))
            .count();
        let waiting = claims
            .iter()
            .filter(|c| matches!(c, Claim::InProgress))
            .count();
        assert_eq!((won, waiting), (1, 3), "round {round}: {claims:?}");
    }
}
