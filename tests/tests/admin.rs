//! The admin port against clients that hold connections and send nothing (#27 item 3): health
//! checks keep getting answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gprxy_tests::proxy::Proxy;

/// An idle connection to `to` from the loopback address `from`.
fn idle_from(from: [u8; 4], to: SocketAddr) -> Option<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::from((from, 0)).into()).ok()?;
    s.connect_timeout(&to.into(), Duration::from_millis(500)).ok()?;
    Some(s)
}

/// One health check: the body within a second, or what went wrong.
fn health(admin: SocketAddr) -> Result<String, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(1))).map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    if started.elapsed() > Duration::from_secs(1) {
        return Err(format!("took {:?}", started.elapsed()));
    }
    Ok(body)
}

#[test]
fn idle_connections_from_one_peer_or_many_do_not_take_health_checks_down() {
    let p = Proxy::start("upstream = \"127.0.0.1:9\"\n");
    let admin = SocketAddr::from(([127, 0, 0, 1], p.admin_port));
    let stop = AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        // One client: 20 idle connections, each reopened when the proxy drops it.
        s.spawn(|| {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Keep the ones the proxy has not closed.
                held.retain(|c| {
                    let mut b = [0u8; 1];
                    let _ = c.set_nonblocking(true);
                    matches!((&*c).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while held.len() < 20 {
                    match TcpStream::connect(admin) {
                        Ok(c) => held.push(c),
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // Many peers (127.0.0.2 to 127.0.0.91): 90 idle connections, more than the listener holds.
        s.spawn(|| {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.clear();
                for i in 2..92u8 {
                    held.extend(idle_from([127, 0, 0, i], admin));
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let results: Vec<_> = (0..10)
            .map(|_| {
                let r = health(admin);
                std::thread::sleep(Duration::from_millis(100));
                r
            })
            .collect();
        stop.store(true, Ordering::Relaxed);
        results
    });
    let failed: Vec<_> = results.iter().filter(|r| r.as_deref() != Ok("ok\n")).collect();
    assert!(failed.is_empty(), "{} of 10 health checks failed: {failed:?}", failed.len());
}
