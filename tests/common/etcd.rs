//! A real etcd cluster on loopback for the tests: free ports, a temporary data dir per
//! member, short elections, every member stopped by its pid when the cluster is dropped
//! (also when a test fails). Needs Debian's `etcd-server` and `etcd-client` (etcdctl) and
//! openssl, which a test run as root installs itself when missing (tools.rs).
#![allow(dead_code)]

#[path = "tools.rs"]
pub mod tools;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub struct Member {
    pub name: String,
    pub client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    pub dir: tempfile::TempDir,
    tls: Option<Tls>,
    /// etcdctl's credentials once auth is enabled (root).
    root_auth: Option<String>,
    /// More flags for every member.
    extra_args: Vec<String>,
    /// One cluster at a time per test binary: a few members on a loaded 2-core machine keep
    /// their short election timeouts, a dozen would not.
    _one_at_a_time: MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Files of a test CA, a server certificate for 127.0.0.1 and a client certificate.
#[derive(Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Installs etcd, etcdctl and openssl when missing and we are root (a fresh Debian machine);
/// fails loudly otherwise (tools.rs).
pub fn ensure_etcd_installed() {
    tools::ensure_tool("etcd", &["etcd-server"]);
    tools::ensure_tool("etcdctl", &["etcd-client"]);
    tools::ensure_tool("openssl", &["openssl"]);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    pub fn start(size: usize) -> Cluster {
        Self::start_with(size, false, &[])
    }

    /// Clients talk https with client certificates; peers stay plain on loopback.
    pub fn start_tls(size: usize) -> Cluster {
        Self::start_with(size, true, &[])
    }

    /// With more etcd flags on every member (a small `--quota-backend-bytes`).
    pub fn start_with_args(size: usize, extra_args: &[&str]) -> Cluster {
        Self::start_with(size, false, extra_args)
    }

    fn start_with(size: usize, tls: bool, extra_args: &[&str]) -> Cluster {
        // A test that failed while holding it poisoned nothing worth refusing.
        let one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        ensure_etcd_installed();
        let dir = tempfile::tempdir().unwrap();
        let tls = tls.then(|| make_certs(dir.path()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            members,
            initial_cluster,
            dir,
            tls,
            root_auth: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            _one_at_a_time: one_at_a_time,
        };
        for i in 0..size {
            cluster.launch(i);
        }
        cluster.wait_healthy(Duration::from_secs(90));
        cluster
    }

    fn launch(&mut self, i: usize) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.dir
                    .path()
                    .join(format!("{}.log", self.members[i].name)),
            )
            .unwrap();
        let m = &self.members[i];
        let state = if m.data_dir.exists() {
            "existing"
        } else {
            "new"
        };
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "backup-coordinator-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "300"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.extra_args);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.server_cert);
            cmd.arg("--key-file").arg(&tls.server_key);
            cmd.arg("--trusted-ca-file").arg(&tls.ca);
            cmd.arg("--client-cert-auth");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// etcdctl against the given members (all when empty).
    pub fn etcdctl_on(&self, members: &[usize], args: &[&str]) -> Output {
        let endpoints: Vec<String> = if members.is_empty() {
            self.endpoints()
        } else {
            members
                .iter()
                .map(|&i| self.members[i].client_url.clone())
                .collect()
        };
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--command-timeout=3s");
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cacert={}", tls.ca.display()));
            cmd.arg(format!("--cert={}", tls.client_cert.display()));
            cmd.arg(format!("--key={}", tls.client_key.display()));
        }
        if let Some(auth) = &self.root_auth {
            cmd.arg(format!("--user={auth}"));
        }
        cmd.args(args).output().expect("run etcdctl")
    }

    /// Writes `value_len`-byte values (at most 40 of them, under the keys `key(i)`) until
    /// etcd refuses a write for its space quota; panics if it never does.
    pub fn fill_past_quota(&self, value_len: usize, key: impl Fn(usize) -> String) {
        let filler = self.dir.path().join("filler");
        std::fs::write(&filler, vec![b'x'; value_len]).unwrap();
        for i in 0..40 {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "etcdctl --endpoints={} put {} < {}",
                    self.endpoints()[0],
                    key(i),
                    filler.display()
                ))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stderr).contains("database space exceeded") {
                return;
            }
        }
        panic!("etcd never reported its quota exhausted");
    }

    /// etcdctl on all members; panics with its output on failure.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_on(&[], args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A field of the first `etcdctl endpoint status -w json` entry ("revision", "dbSize",
    /// "dbSizeInUse"), as a number.
    pub fn status_field(&self, field: &str) -> u64 {
        let json = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let at = json
            .find(&format!("\"{field}\":"))
            .unwrap_or_else(|| panic!("no {field} in {json}"));
        json[at + field.len() + 3..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("{field} in {json}"))
    }

    pub fn wait_healthy(&self, within: Duration) {
        let alive: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .collect();
        let start = Instant::now();
        loop {
            let out = self.etcdctl_on(&alive, &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < within,
                "etcd cluster not healthy within {within:?}: {}{}\nlogs in {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.dir.path().display()
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// The index of the member that is the leader now.
    pub fn leader(&self) -> usize {
        let start = Instant::now();
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let out = self.etcdctl_on(&[i], &["endpoint", "status"]);
                // "127.0.0.1:port, id, version, db size, is leader, is learner, ..."
                let text = String::from_utf8_lossy(&out.stdout);
                if text.split(", ").nth(4) == Some("true") {
                    return i;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no etcd leader");
            sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.members[i].child.as_ref().expect("member running").id()
    }

    /// SIGKILL: the member dies at once, its data dir stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts a killed member from its data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.launch(i);
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    pub fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.launch(i);
            }
        }
        self.wait_healthy(Duration::from_secs(90));
    }

    /// Enables auth: a root user, and `user` with a role that may read and write `prefix`.
    pub fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) {
        self.etcdctl(&["user", "add", "root:rootpw"]);
        self.etcdctl(&["role", "add", "backup"]);
        self.etcdctl(&[
            "role",
            "grant-permission",
            "backup",
            "--prefix=true",
            "readwrite",
            prefix,
        ]);
        self.etcdctl(&["user", "add", &format!("{user}:{password}")]);
        self.etcdctl(&["user", "grant-role", user, "backup"]);
        self.etcdctl(&["auth", "enable"]);
        self.root_auth = Some("root:rootpw".into());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                // SIGCONT first: a SIGSTOPped member would not die until continued.
                // SAFETY: a signal to our own child, which has not been reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian: openssl) is needed for the TLS test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
fn make_certs(dir: &Path) -> Tls {
    let d = dir.join("tls");
    fs::create_dir(&d).unwrap();
    openssl(
        &d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=backup-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "127.0.0.1"), ("client", "backup-client")] {
        openssl(
            &d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            &d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
    Tls {
        ca: d.join("ca.pem"),
        server_cert: d.join("server.pem"),
        server_key: d.join("server.key"),
        client_cert: d.join("client.pem"),
        client_key: d.join("client.key"),
    }
}
