//! A TCP fault proxy for the tests: one in front of each etcd member for each "host", on
//! 127.0.0.1:<ephemeral>, forwarding to the member's client port, with a fault mode the
//! test switches at run time:
//!
//! - [`Mode::Pass`]: bytes flow both ways.
//! - [`Mode::Blackhole`]: connections are accepted and kept open, but nothing is forwarded
//!   either way: what is sent waits (in the proxy and the kernel's buffers) and flows once
//!   the mode is Pass again, as across a network partition that heals.
//! - [`Mode::Delay`]: every chunk, each direction, is forwarded that much later.
//! - [`Mode::DropAnswers`]: requests reach etcd (they are applied) but everything etcd
//!   sends back is discarded: the answers are lost. A connection that lost bytes is closed
//!   when the mode changes (its HTTP/2 stream state is broken), and the client reconnects.
//! - [`Mode::Reset`]: every connection is closed, new ones are closed at once.
//!
//! Threads: one accepting, and per connection a reader and a writer for each direction.
//! Dropping the proxy closes every connection and joins every thread.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Blackhole,
    /// Each chunk forwarded this much later, each direction.
    Delay(Duration),
    DropAnswers,
    Reset,
}

pub struct Proxy {
    /// `http://127.0.0.1:<port>`: an etcd endpoint.
    pub url: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: String,
    state: Mutex<State>,
    changed: Condvar,
    /// Answer bytes discarded in DropAnswers.
    dropped: AtomicUsize,
    accepted: AtomicUsize,
    trigger: Mutex<Option<Trigger>>,
}

/// What to do when a request holding `pattern` goes through (once).
struct Trigger {
    pattern: Vec<u8>,
    action: Arc<dyn Fn(&Shared) + Send + Sync>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

struct State {
    mode: Mode,
    stop: bool,
    conns: Vec<Arc<Connection>>,
}

struct Connection {
    client: TcpStream,
    server: TcpStream,
    /// Lost answer bytes: closed when the mode changes.
    tainted: AtomicBool,
    closed: AtomicBool,
    /// Directions whose writer has ended.
    finished: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Connection {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to etcd: requests.
    Up,
    /// etcd to client: answers.
    Down,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mode once it is not Blackhole; `None` when the connection must end.
    fn wait_open(&self, conn: &Connection) -> Option<Mode> {
        let mut state = self.lock();
        loop {
            if state.stop || conn.closed.load(Ordering::SeqCst) {
                return None;
            }
            match state.mode {
                Mode::Reset => return None,
                Mode::Blackhole => {
                    state = self
                        .changed
                        .wait_timeout(state, Duration::from_millis(50))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                mode => return Some(mode),
            }
        }
    }

    fn set_mode(&self, mode: Mode) {
        let mut state = self.lock();
        let old = std::mem::replace(&mut state.mode, mode);
        for conn in &state.conns {
            let lost_answers = old == Mode::DropAnswers
                && mode != Mode::DropAnswers
                && conn.tainted.load(Ordering::SeqCst);
            if mode == Mode::Reset || lost_answers {
                conn.close();
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Fires the trigger if `chunk` (going to etcd) holds its pattern.
    fn check_trigger(&self, chunk: &[u8]) {
        let fired = {
            let mut trigger = self.trigger.lock().unwrap_or_else(|e| e.into_inner());
            match trigger.as_ref() {
                Some(t) if contains(chunk, &t.pattern) => trigger.take(),
                _ => None,
            }
        };
        if let Some(t) = fired {
            (t.action)(self);
        }
    }

    /// Sleeps until `due`; false when the proxy stops meanwhile.
    fn sleep_until(&self, due: Instant) -> bool {
        let mut state = self.lock();
        loop {
            if state.stop {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                return true;
            }
            state = self
                .changed
                .wait_timeout(state, due - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Proxy {
    /// A proxy in front of `upstream` (`http://host:port`, `https://` too: TLS passes
    /// through), in Pass mode.
    pub fn start(upstream: &str) -> Proxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                mode: Mode::Pass,
                stop: false,
                conns: Vec::new(),
            }),
            changed: Condvar::new(),
            dropped: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            trigger: Mutex::new(None),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fault-proxy-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .unwrap()
        };
        Proxy {
            url: format!("http://{addr}"),
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn mode(&self) -> Mode {
        self.shared.lock().mode
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.set_mode(mode);
    }

    /// Answer bytes discarded so far in DropAnswers.
    pub fn dropped_bytes(&self) -> usize {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        // Joined first: no connection is added after this.
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let conns = std::mem::take(&mut self.shared.lock().conns);
        for conn in conns {
            conn.close();
            let threads = std::mem::take(&mut *conn.threads.lock().unwrap());
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        if shared.lock().stop {
            return;
        }
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.lock().mode == Mode::Reset {
            drop(client);
            continue;
        }
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let Ok(server) = TcpStream::connect(&shared.upstream) else {
            // The member is down: so is the connection.
            continue;
        };
        let _ = server.set_nodelay(true);
        let conn = Arc::new(Connection {
            client,
            server,
            tainted: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            finished: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        for direction in [Direction::Up, Direction::Down] {
            let (src, dst) = match direction {
                Direction::Up => (&conn.client, &conn.server),
                Direction::Down => (&conn.server, &conn.client),
            };
            let (src, dst) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (s, c) = (shared.clone(), conn.clone());
            threads.push(std::thread::spawn(move || {
                read_side(&s, &c, direction, src, tx)
            }));
            let (s, c) = (shared.clone(), conn.clone());
            threads.push(std::thread::spawn(move || write_side(&s, &c, dst, rx)));
        }
        *conn.threads.lock().unwrap() = threads;
        // Kept (ended ones too) until the proxy is dropped, which joins their threads.
        let mut state = shared.lock();
        if state.stop {
            conn.close();
        }
        state.conns.push(conn);
    }
}

fn read_side(
    shared: &Shared,
    conn: &Connection,
    direction: Direction,
    mut src: TcpStream,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if direction == Direction::Up {
            shared.check_trigger(&buf[..n]);
        }
        // Held while the mode is Blackhole.
        let Some(mode) = shared.wait_open(conn) else {
            conn.close();
            return;
        };
        let due = match mode {
            Mode::DropAnswers if direction == Direction::Down => {
                conn.tainted.store(true, Ordering::SeqCst);
                shared.dropped.fetch_add(n, Ordering::SeqCst);
                continue;
            }
            Mode::Delay(delay) => Instant::now() + delay,
            _ => Instant::now(),
        };
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    // The writer forwards what it has, then half-closes.
}

fn write_side(
    shared: &Shared,
    conn: &Connection,
    mut dst: TcpStream,
    rx: mpsc::Receiver<(Instant, Vec<u8>)>,
) {
    while let Ok((due, chunk)) = rx.recv() {
        // Read before a blackhole began: held too.
        if !shared.sleep_until(due) || shared.wait_open(conn).is_none() {
            conn.close();
            return;
        }
        if dst.write_all(&chunk).is_err() {
            conn.close();
            return;
        }
    }
    let _ = dst.shutdown(Shutdown::Write);
    // Both directions done: the connection is over.
    if conn.finished.fetch_add(1, Ordering::SeqCst) == 1 {
        conn.close();
    }
}

/// One proxy per member of a cluster: how one "host" reaches it.
pub struct HostProxies {
    pub proxies: Vec<Proxy>,
}

impl HostProxies {
    /// A proxy in front of each of `endpoints`.
    pub fn start(endpoints: &[String]) -> HostProxies {
        HostProxies {
            proxies: endpoints.iter().map(|e| Proxy::start(e)).collect(),
        }
    }

    /// The endpoints to give this host's client.
    pub fn endpoints(&self) -> Vec<String> {
        self.proxies.iter().map(|p| p.url.clone()).collect()
    }

    /// The same mode on every member's proxy.
    pub fn set_mode(&self, mode: Mode) {
        for proxy in &self.proxies {
            proxy.set_mode(mode);
        }
    }

    pub fn dropped_bytes(&self) -> usize {
        self.proxies.iter().map(Proxy::dropped_bytes).sum()
    }

    /// The first request holding `pattern` (through any member's proxy) reaches etcd, is
    /// applied, and its answer is lost: that proxy drops answers at once (the others reset),
    /// and `hold` later every proxy of this host resets, and stays so until the test sets
    /// another mode. The
    /// request's own retries, and whatever the client sends to clean up, get nowhere.
    /// Returns whether it fired so far.
    pub fn lose_the_answer_to(&self, pattern: &[u8], hold: Duration) -> Arc<AtomicBool> {
        let fired = Arc::new(AtomicBool::new(false));
        let all: Vec<Arc<Shared>> = self.proxies.iter().map(|p| p.shared.clone()).collect();
        let once = fired.clone();
        let action: Arc<dyn Fn(&Shared) + Send + Sync> = Arc::new(move |hit: &Shared| {
            if once.swap(true, Ordering::SeqCst) {
                return;
            }
            hit.set_mode(Mode::DropAnswers);
            // The other members at once: the request's retries get nowhere either.
            for shared in &all {
                if !std::ptr::eq(Arc::as_ptr(shared), hit) {
                    shared.set_mode(Mode::Reset);
                }
            }
            let all = all.clone();
            std::thread::spawn(move || {
                std::thread::sleep(hold);
                for shared in &all {
                    shared.set_mode(Mode::Reset);
                }
            });
        });
        for proxy in &self.proxies {
            *proxy.shared.trigger.lock().unwrap() = Some(Trigger {
                pattern: pattern.to_vec(),
                action: action.clone(),
            });
        }
        fired
    }
}
