//! `make demo-cluster` tells the truth: 3 etcd members and 3 hosts sharing keys and one
//! destination dir, the leader killed mid-run and one host SIGSTOPped past its lease and
//! resumed. Checked here from the files themselves, not from the script's summary: every
//! block present and intact in the shared dir, no temp file left, each block's fence token
//! the highest accepted; from the hosts' fence-log lines (CLOCK_MONOTONIC ns): no write
//! accepted after a write of the same block with a higher token was, the stalled host
//! silent while stopped and active after, its late writes refused; every etcd member it
//! started gone afterwards. And the host's `--peers` check counts a block found in two dirs
//! as wrong.

#[path = "common/etcd.rs"]
mod etcd_cluster;

use etcd_cluster::tools;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

const PLUGIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/incremental_bitmap");
const FILES: usize = 300;
const SIZE: usize = 4096;
/// The script's idempotency lease, and how long it stops a host: the lease + 2 s.
const STALL_NS: u64 = 7_000_000_000;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn block_name(i: usize) -> String {
    format!("vg{:02}_block_{:05}.dat", i % 4, i)
}

/// The content the hosts send for block `i` (taosx_host.c `fill`).
fn fill(i: usize, size: usize) -> Vec<u8> {
    let mut x = 2_166_136_261u32 ^ i as u32;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// One write of a host's fence log: `fence-log accepted|refused KEY token=N t0=NS t1=NS rc=C`.
#[derive(Debug, Clone)]
struct Write {
    host: usize,
    accepted: bool,
    block: String,
    token: u64,
    t0: u64,
    t1: u64,
}

/// `name=value` of a fence-log line's fields.
fn field(fields: &[&str], name: &str) -> Option<u64> {
    fields
        .iter()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .map(|v| v.parse().unwrap())
}

/// A host's writes and every time it logged.
fn fence_log(host: usize, out: &str) -> (Vec<Write>, Vec<u64>) {
    let (mut writes, mut times) = (Vec::new(), Vec::new());
    for line in out.lines().filter(|l| l.starts_with("fence-log ")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        times.extend(["t", "t0", "t1"].iter().filter_map(|n| field(&fields, n)));
        if fields[1] == "accepted" || fields[1] == "refused" {
            writes.push(Write {
                host,
                accepted: fields[1] == "accepted",
                block: fields[2].rsplit('/').next().unwrap().to_string(),
                token: field(&fields, "token").unwrap(),
                t0: field(&fields, "t0").unwrap(),
                t1: field(&fields, "t1").unwrap(),
            });
        }
    }
    (writes, times)
}

/// The stall lines: (host, pid, mono_ns).
fn stall_line(said: &str, verb: &str) -> (usize, u32, u64) {
    let line = said
        .lines()
        .find(|l| l.starts_with("stall: host") && l.contains(verb))
        .unwrap_or_else(|| panic!("no '{verb}' stall line in:\n{said}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let host = words[1].trim_start_matches("host").parse().unwrap();
    let at = |w: &str| words[words.iter().position(|x| *x == w).unwrap() + 1];
    let ns = at("mono_ns").trim_end_matches(',').parse().unwrap();
    (host, at("pid").parse().unwrap(), ns)
}

#[test]
fn every_block_is_intact_in_the_shared_dir_and_a_stalled_hosts_late_writes_are_refused() {
    etcd_cluster::ensure_etcd_installed();
    // The script picks free ports and reads the shared dir with python3; make and gcc
    // build the host.
    tools::ensure_tool("python3", &["python3"]);
    tools::ensure_tool("make", &["make"]);
    tools::ensure_tool("cc", &["gcc", "libc6-dev"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let out = Command::new("make")
        .args(["-C", PLUGIN_DIR, "demo-cluster", "PROFILE=debug"])
        .arg(format!("CLUSTER_DIR={}", dir.display()))
        .output()
        .expect("make runs");
    let said = text(&out);

    // Every etcd member the demo started is stopped, whatever its outcome.
    let pids = said
        .lines()
        .find(|l| l.starts_with("etcd: 3 members at "))
        .and_then(|l| l.split("(pids ").nth(1))
        .unwrap_or_else(|| panic!("no etcd pids in:\n{said}"));
    for pid in pids.trim_end_matches(')').split_whitespace() {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "etcd", "etcd pid {pid} left running:\n{said}");
    }

    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("SIGKILLed") && said.contains("mid-run: yes"),
        "{said}"
    );
    assert!(
        said.contains("host exits                      host0=0 host1=0 host2=0"),
        "{said}"
    );
    assert!(said.contains("PASS: each of the"), "{said}");

    // The shared dir, read here: each block whole, as sent; besides the blocks, only their
    // fence sidecars (no temp file of a write left behind).
    let shared = dir.join("shared").join("backup_set");
    for b in 0..FILES {
        let data = fs::read(shared.join(block_name(b)))
            .unwrap_or_else(|e| panic!("{}: {e}", block_name(b)));
        assert!(
            data == fill(b, SIZE),
            "{} is not the block sent",
            block_name(b)
        );
    }
    let mut entries: Vec<String> = fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let mut expected: Vec<String> = (0..FILES)
        .flat_map(|b| [block_name(b), format!(".{}.fence", block_name(b))])
        .collect();
    expected.sort();
    assert_eq!(entries, expected);

    // The hosts' fence logs.
    let outs: Vec<String> = (0..3)
        .map(|h| fs::read_to_string(dir.join(format!("host{h}.out"))).unwrap())
        .collect();
    let logs: Vec<(Vec<Write>, Vec<u64>)> = outs
        .iter()
        .enumerate()
        .map(|(h, o)| fence_log(h, o))
        .collect();
    let writes: Vec<Write> = logs.iter().flat_map(|(w, _)| w.clone()).collect();
    let mut accepted: HashMap<&str, Vec<&Write>> = HashMap::new();
    for w in writes.iter().filter(|w| w.accepted) {
        accepted.entry(&w.block).or_default().push(w);
    }
    // The fence's order: no write accepted (its call begun) after a write of the same
    // block with a higher token was accepted (its call returned).
    for (block, acc) in &accepted {
        for a in acc {
            for b in acc {
                assert!(
                    !(a.token < b.token && a.t0 > b.t1),
                    "{block}: {a:?} accepted after {b:?}"
                );
            }
        }
    }
    // Each refusal had a newer claim's write of the block before it.
    for r in writes.iter().filter(|w| !w.accepted) {
        assert!(
            accepted[r.block.as_str()]
                .iter()
                .any(|a| a.token > r.token && a.t0 < r.t1),
            "{r:?} refused with no higher token written"
        );
    }
    // Each block's fence holds the highest token accepted for it: the last word is the
    // newest claim's.
    for b in 0..FILES {
        let record = fs::read(shared.join(format!(".{}.fence", block_name(b)))).unwrap();
        assert_eq!(record.len(), 16);
        assert_eq!(&record[..4], b"BCFN");
        let token = u64::from_le_bytes(record[4..12].try_into().unwrap());
        let best = accepted[block_name(b).as_str()]
            .iter()
            .map(|a| a.token)
            .max();
        assert_eq!(Some(token), best, "{}", block_name(b));
    }
    // The work was shared: more than one host's writes were accepted.
    let writers = (0..3)
        .filter(|&h| writes.iter().any(|w| w.host == h && w.accepted))
        .count();
    assert!(writers >= 2, "{said}");

    // The stalled host was really stopped (nothing it logged falls inside the stop) for the
    // lease + 2 s, and resumed (it logged after); its writes begun after the resume that
    // came after a newer claim's write of the block were refused, and there were some.
    let (stalled, pid, t_stop) = stall_line(&said, "SIGSTOPped");
    let (again, pid_again, t_cont) = stall_line(&said, "SIGCONTed");
    assert_eq!((stalled, pid), (again, pid_again), "{said}");
    assert!(
        outs[stalled].contains(&format!("(pid {pid})")),
        "host{stalled} is not pid {pid}"
    );
    assert!(
        t_cont - t_stop >= STALL_NS,
        "stopped {} ns",
        t_cont - t_stop
    );
    let times = &logs[stalled].1;
    assert!(
        !times.iter().any(|&t| t_stop < t && t < t_cont),
        "host{stalled} logged while stopped"
    );
    assert!(
        times.iter().any(|&t| t > t_cont),
        "host{stalled} logged nothing after its resume"
    );
    let late: Vec<&Write> = writes
        .iter()
        .filter(|w| w.host == stalled && w.t0 > t_cont)
        .filter(|w| {
            accepted[w.block.as_str()]
                .iter()
                .any(|a| a.host != stalled && a.token > w.token && a.t1 < w.t0)
        })
        .collect();
    assert!(late.iter().all(|w| !w.accepted), "{late:?}");
    assert!(
        !late.is_empty(),
        "host{stalled} made no late write after a newer claim's: {said}"
    );
    let refused: usize = outs[stalled]
        .lines()
        .filter_map(|l| l.strip_prefix("  refused by fence  "))
        .map(|l| {
            l.split_whitespace()
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        refused,
        writes
            .iter()
            .filter(|w| w.host == stalled && !w.accepted)
            .count()
    );

    // A host whose peer already holds the blocks it writes itself (file store, its own keys,
    // the shared dir as the peer's dir): the duplicates fail its verification and its exit
    // code.
    let solo = tmp.path().join("solo");
    let out = Command::new(Path::new(PLUGIN_DIR).join("build/taosx_host"))
        .args(["--config", "demo/taosx.toml", "--plugin-dir"])
        .arg(dir.join("plugins"))
        .arg("--work-dir")
        .arg(&solo)
        .args([
            "--files",
            &FILES.to_string(),
            "--size",
            &SIZE.to_string(),
            "--failure-rate",
            "0",
        ])
        .arg("--peers")
        .arg(dir.join("shared"))
        .current_dir(PLUGIN_DIR)
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("0 missing, {FILES} wrong")),
        "{said}"
    );
    assert!(said.contains("FAIL"), "{said}");
}
