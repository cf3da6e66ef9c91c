//! A Jepsen-style run of fenced effects on a real 3-member etcd cluster (docs/C_API.md §8.1,
//! docs/GUARANTEES.md).
//!
//! Three host processes (this test binary run again) ship the same blocks under shared
//! idempotency keys with `backup_execute_idempotent_fenced`, each `op` writing its block with
//! `backup_plugin_write_file_fenced` into one shared directory. Each host reaches etcd only
//! through TCP proxies of its own (one per member), so that faults can be aimed at it. Faults
//! drawn from the seed meanwhile: a host partitioned from every member or from the leader
//! only, a host SIGSTOPped past its lease, the etcd leader killed and restarted, a host's
//! answers dropped (the request applied, the answer lost). Each host logs every write it
//! tried (key, token, accepted?) and every call's outcome with monotonic times.
//!
//! The checker then reads the histories and the directory: per key, the accepted writes'
//! tokens never go down in time; the final content is that of the highest token that wrote;
//! every call that returned BACKUP_SUCCESS has its block present and intact; no key stays
//! IN_PROGRESS past lease + timeout + the faults' own length (no orphaned claim blocks it).
//! A failing seed is printed and replays with `JEPSEN_SEED=<seed>`; `JEPSEN_SEEDS=<n>` runs
//! more seeds (the default keeps the run within CI's time).

#[path = "common/proxy.rs"]
mod proxy;

#[path = "common/etcd.rs"]
mod etcd_cluster;

use backup_coordinator::ffi::idempotency::backup_execute_idempotent_fenced;
use backup_coordinator::ffi::plugin::{
    backup_plugin_cleanup, backup_plugin_get_last_error, backup_plugin_init,
    backup_plugin_write_file_fenced,
};
use proxy::{HostProxies, Mode};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_void, CStr, CString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOSTS: usize = 3;
const KEYS: usize = 300;
const THREADS: usize = 3;
const LEASE_MS: u64 = 2_000;
const ETCD_TIMEOUT_MS: u64 = 2_000;
const BLOCK: usize = 512;
/// How long an `op` takes to ship its block before it writes: so that faults land while
/// operations are in flight.
const OP_MS: u64 = 60;
const SUCCESS: i32 = 0;
const IN_PROGRESS: i32 = -14;
const LEASE_LOST: i32 = -17;
const FENCED: i32 = -18;

/// CLOCK_MONOTONIC in ns: one clock for every process of the host.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The block of `key` as the claim `token` writes it: a header naming both, then a payload
/// that depends on the key only.
fn block(key: usize, token: u64) -> Vec<u8> {
    let mut out = format!("key {key} token {token}\n").into_bytes();
    let mut x = 0x9e37_79b9u32 ^ key as u32;
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(x as u8);
    }
    out
}

/// What a file holds: (key, token), when it is a whole and intact block.
fn read_block(path: &Path) -> Option<(usize, u64)> {
    let bytes = std::fs::read(path).ok()?;
    let line = bytes.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    let (Some("key"), Some(key), Some("token"), Some(token)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    let (key, token) = (key.parse().ok()?, token.parse().ok()?);
    (bytes == block(key, token)).then_some((key, token))
}

fn key_name(key: usize) -> String {
    format!("block-{key:04}")
}

// ---------------------------------------------------------------------------------------
// A host: the body of a child process.

struct Ship<'a> {
    key: usize,
    dest: CString,
    out: &'a Mutex<std::io::Stdout>,
}

unsafe extern "C" fn ship(data: *mut c_void, token: u64) -> i32 {
    // SAFETY: `data` is the &Ship that ship_key passed.
    let ship = unsafe { &*(data as *const Ship) };
    std::thread::sleep(Duration::from_millis(OP_MS));
    let bytes = block(ship.key, token);
    let start = mono_ns();
    let rc = backup_plugin_write_file_fenced(
        ship.dest.as_ptr(),
        bytes.as_ptr() as *const c_void,
        bytes.len(),
        token,
    );
    let mut out = ship.out.lock().unwrap();
    let _ = writeln!(out, "WRITE {} {token} {rc} {start} {}", ship.key, mono_ns());
    rc
}

fn ship_key(key: usize, dir: &Path, out: &Mutex<std::io::Stdout>) {
    let name = CString::new(key_name(key)).unwrap();
    let job = Ship {
        key,
        dest: CString::new(dir.join(format!("{}.dat", key_name(key))).to_str().unwrap()).unwrap(),
        out,
    };
    let fingerprint = format!("payload of {key}");
    let started = mono_ns();
    loop {
        let call_started = mono_ns();
        let mut replayed = false;
        let rc = backup_execute_idempotent_fenced(
            name.as_ptr(),
            fingerprint.as_ptr() as *const c_void,
            fingerprint.len(),
            Some(ship),
            &job as *const Ship as *mut c_void,
            &mut replayed,
        );
        let now = mono_ns();
        {
            let mut out = out.lock().unwrap();
            let _ = writeln!(
                out,
                "CALL {key} {rc} {} {call_started} {now}",
                replayed as u8
            );
        }
        // Another host runs it, or the store is cut off: wait for its outcome. A lost
        // claim's late effect is fenced: the key is someone else's now; ask again.
        let again = matches!(rc, IN_PROGRESS | LEASE_LOST | FENCED | -6 | -7 | -11 | -12);
        if !again || Duration::from_nanos(now - started) > Duration::from_secs(60) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The body of a host process; a no-op in the normal test run.
#[test]
fn jepsen_host() {
    let Ok(host) = std::env::var("JEPSEN_HOST") else {
        return;
    };
    let host: usize = host.parse().unwrap();
    let dir = PathBuf::from(std::env::var("JEPSEN_DIR").unwrap());
    let config = std::env::var("JEPSEN_CONFIG").unwrap();
    let seed: u64 = std::env::var("JEPSEN_SEED_OF_RUN")
        .unwrap()
        .parse()
        .unwrap();
    let rc = backup_plugin_init(config.as_ptr() as *const _, config.len() as u32);
    assert_eq!(rc, 0, "init: {:?}", unsafe {
        // SAFETY: the plugin's last error is NUL-terminated.
        CStr::from_ptr(backup_plugin_get_last_error())
    });
    // Every host ships every key, each in an order of its own.
    let mut order: Vec<usize> = (0..KEYS).collect();
    fastrand::Rng::with_seed(seed ^ (host as u64) << 32).shuffle(&mut order);
    let order = Arc::new(order);
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    println!("READY {host}");
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (order, next, out, dir) = (order.clone(), next.clone(), out.clone(), dir.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&key) = order.get(i) else { return };
                ship_key(key, &dir, &out);
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    println!("DONE {host}");
    std::io::stdout().flush().unwrap();
    backup_plugin_cleanup();
}

// ---------------------------------------------------------------------------------------
// The run: a cluster, the hosts, the faults, the checker.

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// One host cut from every member.
    Partition { host: usize, ms: u64 },
    /// One host cut from the member that leads now.
    PartitionFromLeader { host: usize, ms: u64 },
    /// One host stopped past its lease.
    Stall { host: usize, ms: u64 },
    /// The leader SIGKILLed, restarted after `ms`.
    KillLeader { ms: u64 },
    /// One host's answers dropped: requests reach etcd, the answers are lost.
    DropAnswers { host: usize, ms: u64 },
}

impl Fault {
    fn draw(rng: &mut fastrand::Rng) -> Fault {
        let host = rng.usize(0..HOSTS);
        match rng.u32(0..5) {
            0 => Fault::Partition {
                host,
                ms: rng.u64(LEASE_MS / 2..LEASE_MS * 2),
            },
            1 => Fault::PartitionFromLeader {
                host,
                ms: rng.u64(LEASE_MS / 2..LEASE_MS * 2),
            },
            2 => Fault::Stall {
                host,
                ms: rng.u64(LEASE_MS + 200..LEASE_MS * 2),
            },
            3 => Fault::KillLeader {
                ms: rng.u64(300..1_500),
            },
            _ => Fault::DropAnswers {
                host,
                ms: rng.u64(50..400),
            },
        }
    }

    fn ms(&self) -> u64 {
        match *self {
            Fault::Partition { ms, .. }
            | Fault::PartitionFromLeader { ms, .. }
            | Fault::Stall { ms, .. }
            | Fault::KillLeader { ms }
            | Fault::DropAnswers { ms, .. } => ms,
        }
    }
}

struct Host {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, sig) };
}

struct Figures {
    calls: usize,
    writes_accepted: usize,
    writes_refused: usize,
    lease_lost: usize,
    longest_in_progress_ms: u64,
    faults: Vec<Fault>,
    secs: f64,
}

fn run_seed(
    seed: u64,
    cluster: &mut etcd_cluster::Cluster,
    root: &Path,
) -> Result<Figures, String> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = root.join(format!("seed-{seed}"));
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let members = cluster.endpoints();
    // One proxy per member per host.
    let proxies: Vec<HostProxies> = (0..HOSTS).map(|_| HostProxies::start(&members)).collect();
    let mut hosts: Vec<Host> = (0..HOSTS)
        .map(|h| {
            let endpoints: Vec<String> = proxies[h]
                .endpoints()
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect();
            let config = format!(
                "state_backend = \"etcd\"\netcd_endpoints = [{}]\netcd_prefix = \"/jepsen/{seed}/\"\n\
                 etcd_timeout = \"{ETCD_TIMEOUT_MS}ms\"\nidempotency_lease = \"{LEASE_MS}ms\"\n\
                 error_retry_max = 3\nerror_retry_interval = \"50ms\"\n",
                endpoints.join(", ")
            );
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "jepsen_host", "--nocapture", "--test-threads=1"])
                .env("JEPSEN_HOST", h.to_string())
                .env("JEPSEN_DIR", &shared)
                .env("JEPSEN_CONFIG", config)
                .env("JEPSEN_SEED_OF_RUN", seed.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            Host {
                child,
                lines,
                reader: Some(reader),
            }
        })
        .collect();
    let pids: Vec<u32> = hosts.iter().map(|h| h.child.id()).collect();
    // Faults, one after another, while the hosts run.
    let faults: Vec<Fault> = (0..rng.usize(2..=4))
        .map(|_| Fault::draw(&mut rng))
        .collect();
    let running = |hosts: &mut Vec<Host>| {
        hosts
            .iter_mut()
            .any(|h| h.child.try_wait().unwrap().is_none())
    };
    for fault in &faults {
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        if !running(&mut hosts) {
            break;
        }
        let hold = Duration::from_millis(fault.ms());
        match *fault {
            Fault::Partition { host, .. } => {
                proxies[host].set_mode(Mode::Blackhole);
                std::thread::sleep(hold);
                proxies[host].set_mode(Mode::Pass);
            }
            Fault::PartitionFromLeader { host, .. } => {
                let leader = cluster.leader();
                proxies[host].proxies[leader].set_mode(Mode::Blackhole);
                std::thread::sleep(hold);
                proxies[host].proxies[leader].set_mode(Mode::Pass);
            }
            Fault::Stall { host, .. } => {
                signal(pids[host], libc::SIGSTOP);
                std::thread::sleep(hold);
                signal(pids[host], libc::SIGCONT);
            }
            Fault::KillLeader { .. } => {
                let leader = cluster.leader();
                cluster.kill(leader);
                std::thread::sleep(hold);
                cluster.restart(leader);
            }
            Fault::DropAnswers { host, .. } => {
                proxies[host].set_mode(Mode::DropAnswers);
                std::thread::sleep(hold);
                proxies[host].set_mode(Mode::Pass);
            }
        }
    }
    // The hosts finish (bounded: a host that hangs is a finding).
    let deadline = Instant::now() + Duration::from_secs(120);
    while running(&mut hosts) {
        if Instant::now() > deadline {
            for h in &mut hosts {
                let _ = h.child.kill();
            }
            return Err(format!(
                "seed {seed}: hosts still running after 120 s (faults {faults:?})"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut histories = Vec::new();
    for (i, h) in hosts.iter_mut().enumerate() {
        let status = h.child.wait().unwrap();
        h.reader.take().unwrap().join().unwrap();
        let lines = std::mem::take(&mut *h.lines.lock().unwrap());
        if !status.success() || !lines.iter().any(|l| l.starts_with("DONE")) {
            return Err(format!(
                "seed {seed}: host {i} ended with {status}; last lines {:?}",
                &lines[lines.len().saturating_sub(5)..]
            ));
        }
        histories.push(lines);
    }
    drop(proxies);
    let faults_ms: u64 = faults.iter().map(Fault::ms).sum();
    let figures = check(
        seed,
        &shared,
        &histories,
        faults_ms,
        faults.clone(),
        started,
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(figures)
}

/// A write a host tried: (start, end, host, token, code).
type Tried = (u64, u64, usize, u64, i32);
/// A call's outcome: (code, start, end).
type Call = (i32, u64, u64);

/// Reads the histories and the shared directory; the first broken rule is the error.
fn check(
    seed: u64,
    shared: &Path,
    histories: &[Vec<String>],
    faults_ms: u64,
    faults: Vec<Fault>,
    started: Instant,
) -> Result<Figures, String> {
    let fail = |why: String| Err(format!("seed {seed} (faults {faults:?}): {why}"));
    // (start, end, host, token, code) of each write tried, per key; each host's calls per key.
    let mut writes: BTreeMap<usize, Vec<Tried>> = BTreeMap::new();
    let mut calls: HashMap<(usize, usize), Vec<Call>> = HashMap::new();
    for (host, lines) in histories.iter().enumerate() {
        for line in lines {
            let words: Vec<&str> = line.split(' ').collect();
            let num = |i: usize| -> u64 { words[i].parse().unwrap() };
            match words[0] {
                "WRITE" => writes.entry(num(1) as usize).or_default().push((
                    num(4),
                    num(5),
                    host,
                    num(2),
                    words[3].parse().unwrap(),
                )),
                "CALL" => calls.entry((num(1) as usize, host)).or_default().push((
                    words[2].parse().unwrap(),
                    num(4),
                    num(5),
                )),
                _ => {}
            }
        }
    }
    let mut figures = Figures {
        calls: calls.values().map(Vec::len).sum(),
        writes_accepted: 0,
        writes_refused: 0,
        lease_lost: 0,
        longest_in_progress_ms: 0,
        faults: faults.clone(),
        secs: 0.0,
    };
    for key in 0..KEYS {
        let tried = writes.remove(&key).unwrap_or_default();
        let accepted: Vec<_> = tried.iter().filter(|w| w.4 == SUCCESS).collect();
        let mut highest = 0u64;
        for &&(start, _, host, token, _) in &accepted {
            highest = highest.max(token);
            figures.writes_accepted += 1;
            // Accepted: no higher token's write had ended before this one began.
            if let Some(w) = accepted.iter().find(|w| w.3 > token && w.1 < start) {
                return fail(format!("key {key}: host {host}'s token {token} was written after host {}'s token {} had been", w.2, w.3));
            }
        }
        for &(_, end, host, token, _) in tried.iter().filter(|w| w.4 == FENCED) {
            figures.writes_refused += 1;
            // Refused: a higher token's write had begun before this one ended.
            if !accepted.iter().any(|w| w.3 > token && w.0 < end) {
                return fail(format!("key {key}: host {host}'s token {token} was refused, but no higher token had been written"));
            }
        }
        // The final content is the highest token's, whole and intact.
        let path = shared.join(format!("{}.dat", key_name(key)));
        match read_block(&path) {
            Some((k, token)) if k == key && token == highest => {}
            found => {
                return fail(format!(
                    "key {key}: the file holds {found:?}, the highest accepted token is {highest}"
                ))
            }
        }
        for host in 0..HOSTS {
            let Some(outcomes) = calls.get(&(key, host)) else {
                return fail(format!("key {key}: host {host} never called"));
            };
            // Every call that returned SUCCESS has its block there (checked above: the file
            // is whole and intact); the host's last answer is a success.
            let last = outcomes.last().unwrap().0;
            if last != SUCCESS {
                return fail(format!("key {key}: host {host} ended with {last}"));
            }
            figures.lease_lost += outcomes.iter().filter(|o| o.0 == LEASE_LOST).count();
            // No key is kept IN_PROGRESS by an orphaned claim: a streak of IN_PROGRESS
            // answers lasts at most a lease, the store's timeout and the faults' length.
            let mut streak_from = None;
            for &(rc, from, to) in outcomes {
                match (rc, streak_from) {
                    (IN_PROGRESS, None) => streak_from = Some(from),
                    (IN_PROGRESS, Some(_)) => {}
                    (_, Some(begun)) => {
                        let ms = (to - begun) / 1_000_000;
                        figures.longest_in_progress_ms = figures.longest_in_progress_ms.max(ms);
                        streak_from = None;
                    }
                    _ => {}
                }
            }
        }
    }
    let bound = LEASE_MS + ETCD_TIMEOUT_MS + faults_ms + 2_000;
    if figures.longest_in_progress_ms > bound {
        return fail(format!(
            "a key answered IN_PROGRESS for {} ms (bound {bound} ms)",
            figures.longest_in_progress_ms
        ));
    }
    // No temporary file is left behind.
    for entry in std::fs::read_dir(shared).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !name.ends_with(".dat") && !name.ends_with(".fence") {
            return fail(format!("a stray file in the shared directory: {name}"));
        }
    }
    figures.secs = started.elapsed().as_secs_f64();
    Ok(figures)
}

#[test]
fn fenced_effects_hold_under_partitions_pauses_leader_deaths_and_lost_answers() {
    etcd_cluster::ensure_etcd_installed();
    let seeds: Vec<u64> = match std::env::var("JEPSEN_SEED") {
        Ok(seed) => vec![seed.parse().expect("JEPSEN_SEED is a number")],
        Err(_) => {
            let n = std::env::var("JEPSEN_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(50);
            (0x1e_0000..0x1e_0000 + n).collect()
        }
    };
    let mut cluster = etcd_cluster::Cluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let mut totals = (0, 0, 0, 0, 0u64);
    for seed in seeds {
        match run_seed(seed, &mut cluster, root.path()) {
            Ok(f) => {
                println!(
                    "seed {seed}: {:.1} s, {} calls, {} writes accepted, {} refused (FENCED), {} LEASE_LOST, longest IN_PROGRESS {} ms, faults {:?}",
                    f.secs, f.calls, f.writes_accepted, f.writes_refused, f.lease_lost, f.longest_in_progress_ms, f.faults
                );
                totals.0 += f.calls;
                totals.1 += f.writes_accepted;
                totals.2 += f.writes_refused;
                totals.3 += f.lease_lost;
                totals.4 = totals.4.max(f.longest_in_progress_ms);
            }
            Err(why) => panic!("{why}\nreplay with JEPSEN_SEED={seed}"),
        }
    }
    println!(
        "all seeds: {} calls, {} writes accepted, {} refused, {} LEASE_LOST, longest IN_PROGRESS {} ms",
        totals.0, totals.1, totals.2, totals.3, totals.4
    );
}
