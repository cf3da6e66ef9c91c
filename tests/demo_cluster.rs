//! `make demo-cluster` tells the truth: 3 etcd members and 3 hosts sharing keys, the leader
//! killed mid-run, each block on disk exactly once over the hosts' work dirs (counted here,
//! not taken from the script's summary), every etcd member it started gone afterwards. And
//! the host's `--peers` check counts a block found in two work dirs as wrong.

#[path = "common/etcd.rs"]
mod etcd_cluster;

use etcd_cluster::tools;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

const PLUGIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/incremental_bitmap");
const FILES: usize = 300;

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

#[test]
fn each_block_is_written_once_across_three_hosts_while_the_leader_dies() {
    etcd_cluster::ensure_etcd_installed();
    // The script picks free ports with python3; make and gcc build the host.
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
        said.contains(&format!("blocks written once      {FILES} of {FILES}")),
        "{said}"
    );
    assert!(said.contains("PASS: each of the"), "{said}");

    // Count the copies ourselves: one per block over the 3 work dirs, whole.
    let hosts: Vec<_> = (0..3).map(|i| dir.join(format!("host{i}"))).collect();
    let mut per_host = [0usize; 3];
    for b in 0..FILES {
        let holders: Vec<usize> = (0..3)
            .filter(|&h| hosts[h].join("backup_set").join(block_name(b)).exists())
            .collect();
        assert_eq!(holders.len(), 1, "{} on hosts {holders:?}", block_name(b));
        per_host[holders[0]] += 1;
        let len = fs::metadata(hosts[holders[0]].join("backup_set").join(block_name(b)))
            .unwrap()
            .len();
        assert_eq!(len, 4096);
    }
    // Nothing else was written into the backup sets.
    let total: usize = hosts
        .iter()
        .map(|h| fs::read_dir(h.join("backup_set")).unwrap().count())
        .sum();
    assert_eq!(total, FILES);
    // The work was shared: more than one host shipped blocks.
    assert!(
        per_host.iter().filter(|&&n| n > 0).count() >= 2,
        "{per_host:?}"
    );

    // A host whose peer already holds blocks it writes itself (file store, its own keys):
    // the duplicates fail its verification and its exit code. The peer is the host that
    // shipped the most, so that it holds blocks whatever the share of each host was.
    let busiest = (0..hosts.len()).max_by_key(|&i| per_host[i]).unwrap();
    assert!(per_host[busiest] > 0, "{per_host:?}");
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
            "4096",
            "--failure-rate",
            "0",
        ])
        .arg("--peers")
        .arg(&hosts[busiest])
        .current_dir(PLUGIN_DIR)
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("0 missing, {} wrong", per_host[busiest])),
        "{said}"
    );
    assert!(said.contains("FAIL"), "{said}");
}
