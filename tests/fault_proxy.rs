//! The TCP fault proxy of the etcd tests (tests/common/proxy.rs), against a tiny echo
//! server: each mode does what it says, and dropping the proxy ends its threads.

mod common;

use common::proxy::{Mode, Proxy};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Echoes every connection's bytes back; ends with the test binary.
fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

fn connect(proxy: &Proxy) -> TcpStream {
    let conn = TcpStream::connect(proxy.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    conn
}

/// The echo of `msg`, or the read's error kind.
fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> Result<Vec<u8>, ErrorKind> {
    conn.write_all(msg).map_err(|e| e.kind())?;
    let mut got = vec![0u8; msg.len()];
    let mut at = 0;
    while at < msg.len() {
        match conn.read(&mut got[at..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof),
            Ok(n) => at += n,
            Err(e) => return Err(e.kind()),
        }
    }
    Ok(got)
}

fn timed_out(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[test]
fn pass_forwards_both_ways() {
    let proxy = Proxy::start(&echo_server());
    let mut conn = connect(&proxy);
    for i in 0..10 {
        let msg = format!("hello {i}");
        assert_eq!(
            round_trip(&mut conn, msg.as_bytes()).unwrap(),
            msg.as_bytes()
        );
    }
    assert_eq!(proxy.accepted(), 1);
}

#[test]
fn blackhole_holds_everything_and_keeps_connections_open_until_pass() {
    let proxy = Proxy::start(&echo_server());
    let mut conn = connect(&proxy);
    assert_eq!(round_trip(&mut conn, b"before").unwrap(), b"before");
    proxy.set_mode(Mode::Blackhole);
    let err = round_trip(&mut conn, b"held").unwrap_err();
    assert!(timed_out(err), "{err:?}");
    // A new connection is accepted, and gets nothing either.
    let mut late = connect(&proxy);
    let err = round_trip(&mut late, b"late").unwrap_err();
    assert!(timed_out(err), "{err:?}");
    // Healed: what was sent flows, on the same connections.
    proxy.set_mode(Mode::Pass);
    let mut got = [0u8; 4];
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"held");
    late.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    late.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"late");
    assert_eq!(round_trip(&mut conn, b"after").unwrap(), b"after");
}

#[test]
fn delay_delays_each_direction() {
    let proxy = Proxy::start(&echo_server());
    let mut conn = connect(&proxy);
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    proxy.set_mode(Mode::Delay(Duration::from_millis(200)));
    let start = Instant::now();
    assert_eq!(round_trip(&mut conn, b"slow").unwrap(), b"slow");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "{took:?}: 200 ms each way"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    proxy.set_mode(Mode::Pass);
    let start = Instant::now();
    assert_eq!(round_trip(&mut conn, b"fast").unwrap(), b"fast");
    assert!(start.elapsed() < Duration::from_millis(200));
}

#[test]
fn drop_answers_forwards_requests_but_loses_answers_then_closes_the_connection() {
    // An upstream that records what reaches it, and answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    let _ = tx.send(buf[..n].to_vec());
                    let _ = conn.write_all(&buf[..n]);
                }
            });
        }
    });
    let proxy = Proxy::start(&upstream);
    let mut conn = connect(&proxy);
    assert_eq!(round_trip(&mut conn, b"one").unwrap(), b"one");
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), b"one");
    proxy.set_mode(Mode::DropAnswers);
    let err = round_trip(&mut conn, b"applied").unwrap_err();
    assert!(timed_out(err), "{err:?}");
    // The request got there: applied, its answer lost.
    assert_eq!(rx.recv_timeout(Duration::from_secs(2)).unwrap(), b"applied");
    assert_eq!(proxy.dropped_bytes(), b"applied".len());
    // Back to Pass: the connection that lost bytes is closed; a new one works.
    proxy.set_mode(Mode::Pass);
    let mut buf = [0u8; 8];
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(matches!(conn.read(&mut buf), Ok(0) | Err(_)));
    let mut fresh = connect(&proxy);
    assert_eq!(round_trip(&mut fresh, b"two").unwrap(), b"two");
}

#[test]
fn reset_closes_every_connection_and_refuses_new_ones() {
    let proxy = Proxy::start(&echo_server());
    let mut conn = connect(&proxy);
    assert_eq!(round_trip(&mut conn, b"x").unwrap(), b"x");
    proxy.set_mode(Mode::Reset);
    let mut buf = [0u8; 1];
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(matches!(conn.read(&mut buf), Ok(0) | Err(_)));
    let mut refused = connect(&proxy);
    assert!(round_trip(&mut refused, b"y").is_err());
    proxy.set_mode(Mode::Pass);
    let mut fresh = connect(&proxy);
    assert_eq!(round_trip(&mut fresh, b"z").unwrap(), b"z");
}

#[test]
fn dropping_the_proxy_ends_its_connections_and_threads() {
    let proxy = Proxy::start(&echo_server());
    let mut conns: Vec<_> = (0..3).map(|_| connect(&proxy)).collect();
    for conn in &mut conns {
        assert_eq!(round_trip(conn, b"x").unwrap(), b"x");
    }
    proxy.set_mode(Mode::Blackhole);
    let addr = proxy.addr;
    let start = Instant::now();
    drop(proxy);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    for conn in &mut conns {
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(conn.read(&mut buf), Ok(0) | Err(_)));
    }
    // Nobody listens any more.
    assert!(TcpStream::connect(addr).is_err());
}
