//! Several processes ("hosts") sharing one real etcd cluster (C_API §9): every key's
//! operation runs exactly once while the leader is SIGKILLed and restarted; a log-backup
//! run moves to another host when its host is killed mid-wait.
//!
//! The test binary re-runs itself as the hosts (`etcd_host_child`, which does nothing
//! unless ETCD_HOST_ROLE is set).

#[path = "common/etcd.rs"]
mod etcd_cluster;

use backup_coordinator::cancel::Cancelled;
use backup_coordinator::clock::unix_ms_now;
use backup_coordinator::clock::SystemClock;
use backup_coordinator::error::Error;
use backup_coordinator::error::ErrorCode;
use backup_coordinator::etcd::idempotency::EtcdIdempotencyStore;
use backup_coordinator::etcd::log_records::EtcdLogRecords;
use backup_coordinator::etcd::{EtcdClient, EtcdSettings};
use backup_coordinator::idempotency::{fingerprint, Claim, Completion, IdempotencyStore, KeyState};
use backup_coordinator::log_backup::records::{LogRecordStore, RetryRecord, Sequence};
use backup_coordinator::log_backup::runner::{
    LogMetrics, LogRetryPolicy, RunOutcome, Runner, TaskDriver,
};
use backup_coordinator::log_backup::KernelState;
use backup_coordinator::log_backup::SubCommand;
use backup_coordinator::retry::Sleeper;
use etcd_cluster::Cluster;
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PREFIX: &str = "/taosx/hosts/";
const KEYS: usize = 300;

fn settings_from(endpoints: &str) -> EtcdSettings {
    let mut s = EtcdSettings::new(endpoints.split(',').map(String::from).collect());
    s.prefix = PREFIX.into();
    s.timeout = Duration::from_secs(3);
    s
}

fn spawn_host(role: &str, cluster: &Cluster, run_log: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .stdin(Stdio::piped())
        .args([
            "--exact",
            "etcd_host_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ETCD_HOST_ROLE", role)
        .env("ETCD_HOST_ENDPOINTS", cluster.endpoints().join(","))
        .env("ETCD_HOST_LOG", run_log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Kills the hosts still running when dropped (a failing test leaves none behind).
struct Hosts(Vec<Child>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn etcd_host_child() {
    let Ok(role) = std::env::var("ETCD_HOST_ROLE") else {
        return;
    };
    let settings = settings_from(&std::env::var("ETCD_HOST_ENDPOINTS").unwrap());
    let log = PathBuf::from(std::env::var("ETCD_HOST_LOG").unwrap());
    let client = Arc::new(EtcdClient::new(&settings).unwrap());
    match role.as_str() {
        "keys" => run_keys(client, &log),
        "log-run" => hold_log_run(client),
        "stalling-owner" => stalling_owner(client),
        "log-runner" => {
            let outcome = run_log_command(client, &log);
            panic!("host A should have been killed in its second wait, got {outcome:?}");
        }
        other => panic!("unknown role {other}"),
    }
}

/// Works through every key until each one is done (run here, or replayed), retrying the
/// keys another host holds and the calls that failed while the cluster had no leader.
fn run_keys(client: Arc<EtcdClient>, log: &Path) {
    let store = EtcdIdempotencyStore::new(
        client.clone(),
        Duration::from_secs(3),
        Duration::from_secs(3600),
    );
    let mut pending: Vec<usize> = (0..KEYS).collect();
    fastrand::seed(std::process::id() as u64);
    fastrand::shuffle(&mut pending);
    let (mut ran, mut failures) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(150);
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "keys left undone: {}",
            pending.len()
        );
        let mut next = Vec::new();
        for i in pending {
            let key = format!("block/{i}");
            let fp = fingerprint(key.as_bytes());
            match store.claim(key.as_bytes(), &fp, unix_ms_now()) {
                Ok(Claim::Acquired { token, .. }) => {
                    // The operation: one line in the shared run log.
                    let mut file = OpenOptions::new().append(true).open(log).unwrap();
                    file.write_all(format!("{key} {}\n", std::process::id()).as_bytes())
                        .unwrap();
                    drop(file);
                    std::thread::sleep(Duration::from_millis(2));
                    ran += 1;
                    // A live owner keeps its claim while it retries its completion.
                    loop {
                        match store.complete(key.as_bytes(), token, &fp, 0, unix_ms_now()) {
                            Ok(Completion::Recorded) => break,
                            Ok(Completion::Superseded) => {
                                panic!("{key}: a live owner was superseded")
                            }
                            Err(_) => {
                                failures += 1;
                                let _ = store
                                    .renew(&[(key.clone().into_bytes(), token)], unix_ms_now());
                            }
                        }
                    }
                }
                Ok(Claim::Replay { result: 0 }) => {}
                Ok(Claim::InProgress) => next.push(i),
                Ok(other) => panic!("{key}: {other:?}"),
                Err(failure) => {
                    // Fail closed: nothing ran; try again later.
                    assert!(
                        failure.code() == ErrorCode::Network.raw()
                            || failure.code() == ErrorCode::ConnectionLost.raw(),
                        "{failure:?}"
                    );
                    failures += 1;
                    next.push(i);
                }
            }
        }
        pending = next;
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "host {} ran {ran} failures {failures} failovers {}",
        std::process::id(),
        client.failovers()
    );
}

/// Claims a key, keeps its lease alive from a thread (as the plugin's lease keeper does),
/// runs a long operation (during which the test SIGSTOPs us), then completes and releases.
fn stalling_owner(client: Arc<EtcdClient>) {
    let store = Arc::new(EtcdIdempotencyStore::new(
        client,
        Duration::from_secs(1),
        Duration::from_secs(3600),
    ));
    let fp = fingerprint(b"stalled payload");
    let Claim::Acquired { token, .. } = store.claim(b"stalled", &fp, unix_ms_now()).unwrap() else {
        panic!("the first owner must acquire");
    };
    let keeper_store = store.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(250));
        let _ = keeper_store.renew(&[(b"stalled".to_vec(), token)], unix_ms_now());
    });
    println!("claimed {}", token.0);
    std::io::stdout().flush().unwrap();
    // The operation; the test stops us in here and resumes us after a takeover.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let completion = store
        .complete(b"stalled", token, &fp, 0, unix_ms_now())
        .unwrap();
    store.release(b"stalled", token).unwrap();
    println!("completion {completion:?}");
    std::io::stdout().flush().unwrap();
}

/// A task whose START keeps failing with a network error; each attempt is one line
/// "<pid> <unix ms>" in `log`.
struct FailingTask<'a> {
    log: &'a Path,
}

impl TaskDriver for FailingTask<'_> {
    fn query(&mut self) -> Result<(KernelState, bool), Error> {
        Ok((KernelState::NotExist, false))
    }
    fn execute(&mut self, _command: SubCommand) -> i32 {
        let mut file = OpenOptions::new().append(true).open(self.log).unwrap();
        file.write_all(format!("{} {}\n", std::process::id(), unix_ms_now()).as_bytes())
            .unwrap();
        ErrorCode::Network.raw()
    }
}

struct RealSleeper;

impl Sleeper for RealSleeper {
    fn sleep(&mut self, duration: Duration) -> Result<(), Cancelled> {
        std::thread::sleep(duration);
        Ok(())
    }
}

const LOG_TASK: &str = "moving task";
const LOG_POLICY: LogRetryPolicy = LogRetryPolicy {
    max_retry: 3,
    min_wait: Duration::from_millis(1500),
    max_wait: Duration::from_millis(1500),
    timeout: Duration::from_secs(120),
};

/// `backup_log_run_command`'s runner on the etcd record store.
fn run_log_command(client: Arc<EtcdClient>, log: &Path) -> RunOutcome {
    let store = EtcdLogRecords::new(client, Duration::from_secs(2));
    let metrics = LogMetrics::default();
    let mut sleeper = RealSleeper;
    let mut runner = Runner {
        store: &store,
        clock: &SystemClock,
        sleeper: &mut sleeper,
        metrics: &metrics,
    };
    runner.run(
        LOG_TASK,
        SubCommand::Start,
        &LOG_POLICY,
        &mut FailingTask { log },
    )
}

fn sample_sequence() -> Sequence {
    let now = unix_ms_now();
    Sequence {
        records: vec![
            RetryRecord {
                retry_num: 1,
                detect_failed_at_ms: now - 60_000,
                expected_retry_at_ms: now - 30_000,
                real_retry_at_ms: now - 29_990,
                reason_code: ErrorCode::Network.raw(),
                original_reason: "execute start failed: Network error".into(),
            },
            RetryRecord {
                retry_num: 2,
                detect_failed_at_ms: now - 29_000,
                expected_retry_at_ms: now + 31_000,
                real_retry_at_ms: 0,
                reason_code: ErrorCode::Timeout.raw(),
                original_reason: "execute start failed: Operation timeout".into(),
            },
        ],
        outcome: None,
        first_failure_ms: Some(now - 60_000),
    }
}

/// Host A: takes the run, saves the sequence as it stands in its second wait, and waits.
fn hold_log_run(client: Arc<EtcdClient>) {
    let store = EtcdLogRecords::new(client, Duration::from_secs(2));
    let run = store.begin_run("task/é 1", SubCommand::Start).unwrap();
    let sequence = sample_sequence();
    run.save(&sequence).unwrap();
    println!("saved {}", sequence.records[1].expected_retry_at_ms);
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

/// The first line of a host's output from `marker` on (the test harness prints
/// its own lines too); the rest of the output is read and dropped.
fn marked_line(child: &mut Child, marker: &str) -> String {
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the host printed no {marker:?} line"
        );
        // libtest may print "test etcd_host_child ... " on the same line first.
        if let Some(at) = line.find(marker) {
            // Drain in the background, so that the host never writes into a closed pipe.
            let found = line[at..].trim().to_string();
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return found;
        }
    }
}

fn lines(path: &Path) -> usize {
    fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

fn wait_for_lines(path: &Path, n: usize, hosts: &mut Hosts) {
    let start = Instant::now();
    while lines(path) < n {
        for child in &mut hosts.0 {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "a host failed: {status}");
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "hosts made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn etcd_three_hosts_run_every_key_once_while_the_leader_dies() {
    let mut cluster = Cluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran.log");
    fs::write(&log, "").unwrap();
    let mut hosts = Hosts((0..3).map(|_| spawn_host("keys", &cluster, &log)).collect());

    wait_for_lines(&log, KEYS / 4, &mut hosts);
    let leader = cluster.leader();
    cluster.kill(leader); // SIGKILL, mid-run
    wait_for_lines(&log, KEYS / 2, &mut hosts);
    // The killed member comes back from its data dir while the hosts work.
    cluster.restart(leader);

    let mut summaries = Vec::new();
    for child in &mut hosts.0 {
        let out = marked_line(child, "host ");
        let status = child.wait().unwrap();
        assert!(status.success(), "a host failed: {status}");
        summaries.push(out);
    }
    let text = fs::read_to_string(&log).unwrap();
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for line in text.lines() {
        *runs.entry(line.split(' ').next().unwrap()).or_default() += 1;
    }
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    assert_eq!(runs.len(), KEYS, "every key ran: {summaries:?}");
    // More than one host did work, and each key is recorded as completed.
    let hosts_that_ran: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.split(' ').nth(1)).collect();
    assert!(hosts_that_ran.len() > 1, "{summaries:?}");
    let check = EtcdIdempotencyStore::new(
        Arc::new(EtcdClient::new(&settings_from(&cluster.endpoints().join(","))).unwrap()),
        Duration::from_secs(3),
        Duration::from_secs(3600),
    );
    for i in [0, KEYS / 2, KEYS - 1] {
        let record = check
            .get(format!("block/{i}").as_bytes(), unix_ms_now())
            .unwrap()
            .unwrap();
        assert!(matches!(
            record.state,
            KeyState::Completed { result: 0, .. }
        ));
    }
    eprintln!("hosts: {summaries:?}");
}

#[test]
fn etcd_log_backup_run_moves_to_another_host() {
    let cluster = Cluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let mut host_a = Hosts(vec![spawn_host(
        "log-run",
        &cluster,
        &dir.path().join("unused"),
    )]);
    let line = marked_line(&mut host_a.0[0], "saved ");

    let client = Arc::new(EtcdClient::new(&settings_from(&cluster.endpoints().join(","))).unwrap());
    let host_b = EtcdLogRecords::new(client, Duration::from_secs(2));
    let task = "task/é 1";
    // While A lives, B may neither run (task, command) nor reset it.
    let busy = host_b
        .begin_run(task, SubCommand::Start)
        .err()
        .expect("A holds the run");
    assert_eq!(busy.code(), ErrorCode::InProgress.raw(), "{busy:?}");
    let busy = host_b.reset(task, SubCommand::Start).unwrap_err();
    assert_eq!(busy.code(), ErrorCode::InProgress.raw(), "{busy:?}");
    // Another command of the same task is free.
    drop(host_b.begin_run(task, SubCommand::Stop).unwrap());

    // A dies in its second wait; B takes the run over once A's lease has run out.
    host_a.0[0].kill().unwrap();
    host_a.0[0].wait().unwrap();
    let start = Instant::now();
    let run = loop {
        match host_b.begin_run(task, SubCommand::Start) {
            Ok(run) => break run,
            Err(f) if f.code() == ErrorCode::InProgress.raw() => {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "A's run claim never expired"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(f) => panic!("{f:?}"),
        }
    };
    // Same count, same budget, the same instant to wait for.
    let sequence = host_b
        .load(task, SubCommand::Start)
        .unwrap()
        .expect("A's records");
    assert_eq!(sequence.records.len(), 2);
    assert_eq!(sequence.outcome, None);
    let expected_at: u64 = line.trim().strip_prefix("saved ").unwrap().parse().unwrap();
    assert_eq!(sequence.records[1].expected_retry_at_ms, expected_at);
    assert_eq!(
        sequence.records[0].original_reason,
        "execute start failed: Network error"
    );
    // B finishes the sequence: success clears the records.
    run.remove().unwrap();
    drop(run);
    assert_eq!(host_b.load(task, SubCommand::Start).unwrap(), None);
    host_b.reset(task, SubCommand::Start).unwrap();
}

/// kill(2) itself, not procps's kill(1), which a minimal Debian may lack.
fn signal(child: &Child, sig: &str) {
    let sig = match sig {
        "-STOP" => libc::SIGSTOP,
        "-CONT" => libc::SIGCONT,
        other => panic!("signal {other}?"),
    };
    // SAFETY: a signal to our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

#[test]
fn etcd_sigstopped_owner_is_fenced_after_a_takeover() {
    let cluster = Cluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let mut owner = Hosts(vec![spawn_host(
        "stalling-owner",
        &cluster,
        &dir.path().join("unused"),
    )]);
    let mut reader = BufReader::new(owner.0[0].stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("claimed ") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the owner printed nothing"
        );
    }
    let settings = settings_from(&cluster.endpoints().join(","));
    let taker = EtcdIdempotencyStore::new(
        Arc::new(EtcdClient::new(&settings).unwrap()),
        Duration::from_secs(30),
        Duration::from_secs(3600),
    );
    let third = EtcdIdempotencyStore::new(
        Arc::new(EtcdClient::new(&settings).unwrap()),
        Duration::from_secs(30),
        Duration::from_secs(3600),
    );
    let fp = fingerprint(b"stalled payload");
    // A live owner, renewing: nobody takes over however long it runs.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        taker.claim(b"stalled", &fp, unix_ms_now()).unwrap(),
        Claim::InProgress
    );

    // SIGSTOP (a VM pause): its lease runs out and the key is taken over.
    signal(&owner.0[0], "-STOP");
    let start = Instant::now();
    let token = loop {
        match taker.claim(b"stalled", &fp, unix_ms_now()).unwrap() {
            Claim::Acquired { token, .. } => break token,
            Claim::InProgress if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            other => panic!("{other:?}"),
        }
    };
    // Resumed: its operation ends, its completion and release are fenced.
    signal(&owner.0[0], "-CONT");
    owner.0[0].stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    while !line.contains("completion ") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the owner died");
    }
    assert!(line.contains("completion Superseded"), "{line}");
    assert!(owner.0[0].wait().unwrap().success());
    // The taker's claim stands: a third caller still waits for it.
    assert_eq!(
        third.claim(b"stalled", &fp, unix_ms_now()).unwrap(),
        Claim::InProgress
    );
    let record = third.get(b"stalled", unix_ms_now()).unwrap().unwrap();
    assert!(matches!(record.state, KeyState::Claimed { token: t, .. } if t == token));
    assert_eq!(
        taker
            .complete(b"stalled", token, &fp, 0, unix_ms_now())
            .unwrap(),
        Completion::Recorded
    );
    assert_eq!(
        third.claim(b"stalled", &fp, unix_ms_now()).unwrap(),
        Claim::Replay { result: 0 }
    );
}

#[test]
fn etcd_log_backup_sequence_continues_on_another_host_after_a_kill() {
    let cluster = Cluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("attempts.log");
    fs::write(&log, "").unwrap();
    let mut host_a = Hosts(vec![spawn_host("log-runner", &cluster, &log)]);
    // The first attempt and the first retry have failed: A is in its second wait.
    wait_for_lines(&log, 2, &mut host_a);
    std::thread::sleep(Duration::from_millis(300));
    host_a.0[0].kill().unwrap();
    host_a.0[0].wait().unwrap();
    assert_eq!(lines(&log), 2, "A was killed in its second wait");

    // Host B (its own client, no shared files): the same (task, command) goes on.
    let client = Arc::new(EtcdClient::new(&settings_from(&cluster.endpoints().join(","))).unwrap());
    let start = Instant::now();
    let outcome = loop {
        let outcome = run_log_command(client.clone(), &log);
        match &outcome.result {
            // A's run claim lives until its lease runs out.
            Err(f) if f.code() == ErrorCode::InProgress.raw() => {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "A's run claim never expired"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => break outcome,
        }
    };
    let code = outcome.result.as_ref().unwrap_err().code();
    assert_eq!(code, ErrorCode::RetryExhausted.raw(), "{outcome:?}");
    let text = fs::read_to_string(&log).unwrap();
    let attempts: Vec<(&str, u64)> = text
        .lines()
        .map(|l| {
            let (pid, at) = l.split_once(' ').unwrap();
            (pid, at.parse().unwrap())
        })
        .collect();
    assert_eq!(
        attempts.len(),
        1 + LOG_POLICY.max_retry as usize,
        "1 + max retries in all: {text}"
    );
    let b_pid = std::process::id().to_string();
    assert!(attempts[2..].iter().all(|(pid, _)| *pid == b_pid), "{text}");
    // B's first attempt is A's second retry: not before A's wait was over.
    assert!(attempts[2].1 >= attempts[1].1 + 1500, "{text}");
    // The exhausted sequence stays readable on every host.
    let store = EtcdLogRecords::new(client, Duration::from_secs(2));
    let sequence = store.load(LOG_TASK, SubCommand::Start).unwrap().unwrap();
    assert_eq!(sequence.records.len(), LOG_POLICY.max_retry as usize);
    assert_eq!(sequence.outcome, Some(ErrorCode::RetryExhausted.raw()));
}
