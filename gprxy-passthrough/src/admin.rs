//! The admin listener: `GET /metrics` (Prometheus text format) and `GET /healthz`.
//!
//! Anyone who can reach the port can read the metrics and the health; what they must not do
//! is take the port down for the load balancer's checks. So: a request must arrive whole within
//! [`HEADER_TIMEOUT`]; one peer address holds at most [`PER_PEER`] connections; and a new
//! connection beyond either limit ([`PER_PEER`] for its address, [`MAX_ADMIN_CONNECTIONS`] in
//! all) evicts the oldest connection still waiting for its request (of that address, or of any),
//! so a health check that sends its request at once always gets in, however many idle
//! connections anyone holds, the same host included. Only connections being answered are never
//! evicted; a new one beyond the limits when all are being answered is closed at accept.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::conn::accept_failed;
use crate::session::Proxy;

/// Admin connections open at once (file descriptors the sessions keep).
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Connections one peer address may hold.
const PER_PEER: usize = 4;
/// Time from accept to the request's end of headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Who holds admin connections now.
#[derive(Default)]
struct Admission {
    open: usize,
    per_peer: HashMap<IpAddr, usize>,
    /// Connections still waiting for their request, oldest first, with how to evict each.
    waiting: VecDeque<(u64, IpAddr, oneshot::Sender<()>)>,
    next_id: u64,
}

/// One admitted connection's place; given back when dropped.
struct Place {
    id: u64,
    peer: IpAddr,
    admission: Arc<Mutex<Admission>>,
}

impl Place {
    /// The request arrived: no longer evictable.
    fn served(&self) {
        self.admission.lock().waiting.retain(|(id, _, _)| *id != self.id);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut a = self.admission.lock();
        a.open -= 1;
        a.waiting.retain(|(id, _, _)| *id != self.id);
        if let Some(n) = a.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                a.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Admits a connection from `peer`, evicting the oldest waiting one when full; None: refused.
fn admit(admission: &Arc<Mutex<Admission>>, peer: IpAddr) -> Option<(Place, oneshot::Receiver<()>)> {
    let mut a = admission.lock();
    // The evicted connection's place is given back when its task ends: counted meanwhile, so
    // the limits may be passed by connections that are on their way out.
    if a.per_peer.get(&peer).copied().unwrap_or(0) >= PER_PEER {
        let at = a.waiting.iter().position(|(_, p, _)| *p == peer)?;
        let (_, _, evict) = a.waiting.remove(at)?;
        let _ = evict.send(());
    } else if a.open >= MAX_ADMIN_CONNECTIONS {
        let (_, _, evict) = a.waiting.pop_front()?;
        let _ = evict.send(());
    }
    a.open += 1;
    *a.per_peer.entry(peer).or_default() += 1;
    a.next_id += 1;
    let id = a.next_id;
    let (tx, rx) = oneshot::channel();
    a.waiting.push_back((id, peer, tx));
    Some((Place { id, peer, admission: admission.clone() }, rx))
}

/// What the admin listener serves: the proxy's, or `gprxy connect`'s.
pub trait AdminSource: Send + Sync + 'static {
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
    /// Whether new connections are refused (`/healthz` answers 503).
    fn draining(&self) -> bool;
}

impl AdminSource for Proxy {
    fn metrics(&self) -> String {
        self.shared.metrics.render()
    }

    fn draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }
}

/// Serves until the process ends. Requests are read up to 4 KiB; anything else is 404.
/// `/healthz` answers 503 `draining` once SIGTERM has stopped new connections.
pub async fn serve<S: AdminSource>(listener: TcpListener, proxy: Arc<S>) {
    let admission = Arc::new(Mutex::new(Admission::default()));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(&e).await;
                continue;
            }
        };
        let Some((place, evicted)) = admit(&admission, peer.ip()) else { continue };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut sock = sock;
            // Evicted only while waiting for the request: once it is served the sender is
            // dropped (an Err here), which must not cut the answer short.
            let evicted_first = {
                let served = answer(&mut sock, &place, &*proxy);
                tokio::pin!(served);
                tokio::select! {
                    () = &mut served => false,
                    Ok(()) = evicted => true,
                }
            };
            // A connection whose request already sits in its socket (a health check this task
            // had not read yet) is answered anyway: only silent ones make room.
            if evicted_first && request_waiting(&sock) {
                answer(&mut sock, &place, &*proxy).await;
            }
        });
    }
}

/// Whether bytes the peer sent wait unread in the socket (a non-blocking peek).
fn request_waiting(sock: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(sock).peek(&mut byte), Ok(n) if n > 0)
}

/// Reads one request (within [`HEADER_TIMEOUT`]) and answers it.
async fn answer<S: AdminSource>(sock: &mut TcpStream, place: &Place, proxy: &S) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    let read = tokio::time::timeout(HEADER_TIMEOUT, async {
        while n < buf.len() {
            let m = sock.read(&mut buf[n..]).await?;
            if m == 0 {
                break;
            }
            n += m;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    place.served();
    let line = String::from_utf8_lossy(&buf[..n]);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match (line.starts_with("GET "), path) {
        (true, "/metrics") => ("200 OK", "text/plain; version=0.0.4", proxy.metrics()),
        (true, "/healthz") if proxy.draining() => {
            ("503 Service Unavailable", "text/plain", "draining\n".to_owned())
        }
        (true, "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(HEADER_TIMEOUT * 5, sock.write_all(resp.as_bytes())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_is_capped_and_a_full_listener_evicts_the_oldest_waiting_connection() {
        let admission = Arc::new(Mutex::new(Admission::default()));
        let one: IpAddr = "127.0.0.1".parse().unwrap();
        let mut held: Vec<_> = (0..PER_PEER).map(|_| admit(&admission, one).unwrap()).collect();
        // A fifth from one peer evicts that peer's oldest waiting one.
        let fifth = admit(&admission, one).expect("evicts");
        assert!(held[0].1.try_recv().is_ok(), "the peer's oldest was evicted");
        drop(held.remove(0));
        held.insert(0, fifth);
        // When every connection of the peer is being answered, a new one is refused.
        for (place, _) in &held {
            place.served();
        }
        assert!(admit(&admission, one).is_none(), "nothing of the peer's to evict");
        for (place, _) in &held[1..] {
            // Waiting again, for the test below (evictable).
            place.admission.lock().waiting.push_back((place.id, place.peer, oneshot::channel().0));
        }
        // Fill the listener from many peers.
        for i in 0..(MAX_ADMIN_CONNECTIONS - PER_PEER) {
            let peer: IpAddr = format!("127.0.1.{}", i % 250).parse().unwrap();
            held.push(admit(&admission, peer).expect("room"));
        }
        assert_eq!(admission.lock().open, MAX_ADMIN_CONNECTIONS);
        // A health check still gets in: the oldest waiting connection is told to go.
        let checker: IpAddr = "10.9.9.9".parse().unwrap();
        let before = admission.lock().waiting.front().map(|(id, _, _)| *id);
        let (_check, _) = admit(&admission, checker).expect("evicts the oldest");
        let after = admission.lock().waiting.front().map(|(id, _, _)| *id);
        assert_ne!(before, after, "the oldest waiting connection was evicted");
        // Dropping gives places back.
        let open = admission.lock().open;
        drop(held.remove(0));
        assert_eq!(admission.lock().open, open - 1);
        assert_eq!(admission.lock().per_peer[&one], PER_PEER - 1);
    }
}
