//! Who may use the connector: a Unix socket in a private folder, whose peers are checked by
//! their credentials (`SO_PEERCRED`), and, only when asked, a TCP listener on loopback whose
//! peers are looked up in the kernel's socket table: the owner uid of the socket whose local
//! address is the peer's and whose remote address is ours, as an ident server would answer.
//! The lookup asks sock_diag (netlink, `SOCK_DIAG_BY_FAMILY` with the exact address pair: the
//! kernel finds the one socket, in microseconds); where netlink is not allowed it reads
//! `/proc/net/tcp` and `/proc/net/tcp6` (the kernel walks every socket bucket to print them:
//! about 5 ms each here). Any other OS user is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use anyhow::{bail, Context};

use super::config::{own_uid, Listen};

/// Who may connect: this process's user and the configured ones.
#[derive(Debug, Clone)]
pub struct Allowed {
    own: u32,
    others: Vec<u32>,
}

impl Allowed {
    /// From the profile's listener settings.
    pub fn new(listen: &Listen) -> anyhow::Result<Self> {
        Ok(Self { own: own_uid()?, others: listen.allow_uids.clone() })
    }

    /// Whether `uid` may connect.
    pub fn permits(&self, uid: u32) -> bool {
        uid == self.own || self.others.contains(&uid)
    }
}

/// Makes the socket folder (0700, or 0711 when other users are allowed: they may reach the
/// socket by name but not list the folder), refusing one another user owns, and binds the socket
/// (0600, or 0666 with other users allowed: their credentials are checked on each connection).
/// A socket left by a connector that is gone is replaced; a live one is refused.
pub fn bind_unix(listen: &Listen, own: u32) -> anyhow::Result<tokio::net::UnixListener> {
    let dir = &listen.unix_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Every folder above it too: one another user owns, or may write without the sticky bit,
    // lets them move ours away and put their own socket where the application connects.
    for above in dir.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
        let m = std::fs::metadata(above).with_context(|| format!("cannot read {}", above.display()))?;
        if m.uid() != own && m.uid() != 0 {
            bail!(
                "{}: belongs to uid {}, who could replace the socket folder below it",
                above.display(),
                m.uid()
            );
        }
        let mode = m.mode();
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            bail!(
                "{}: others may write it (mode {:o}, no sticky bit) and could replace the socket folder below it",
                above.display(),
                mode & 0o7777
            );
        }
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{}: not a folder", dir.display());
    }
    if meta.uid() != own {
        bail!("{}: belongs to uid {}, not to this user ({own})", dir.display(), meta.uid());
    }
    let shared = !listen.allow_uids.is_empty();
    let dir_mode = if shared { 0o711 } else { 0o700 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))
        .with_context(|| format!("cannot chmod {}", dir.display()))?;
    let path = listen.socket_path();
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            bail!("{}: another connector is listening there", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot remove the stale {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let sock_mode = if shared { 0o666 } else { 0o600 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(sock_mode))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(listener)
}

/// The uid on the other end of a Unix socket.
pub fn unix_peer_uid(s: &tokio::net::UnixStream) -> std::io::Result<u32> {
    Ok(s.peer_cred()?.uid())
}

/// Binds the TCP listener, refusing anything but a loopback address (checked at configuration
/// too; checked again here, where it matters).
pub async fn bind_tcp(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address; gprxy connect listens only on 127.0.0.1 or ::1");
    }
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))
}

/// The owner uid of the socket at `peer` connected to `ours`, from the kernel's socket table.
/// None when no such socket is listed (the peer is gone, or in another network namespace).
pub fn tcp_peer_uid(peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    match sock_diag_uid(peer, ours) {
        Ok(found) => found,
        Err(_) => proc_table_uid(peer, ours),
    }
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const AF_NETLINK: i32 = 16;
const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const IPPROTO_TCP: u8 = 6;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// Offset of `idiag_uid` in `struct inet_diag_msg` (family, state, timer, retrans: 4 bytes;
/// `inet_diag_sockid`: 48; expires, rqueue, wqueue: 12).
const UID_OFFSET: usize = 4 + 48 + 12;
/// `idiag_state` (after `idiag_family`), and `TCP_ESTABLISHED`.
const STATE_OFFSET: usize = 1;
const TCP_ESTABLISHED: u8 = 1;
/// `idiag_inode`, after `idiag_uid`.
const INODE_OFFSET: usize = UID_OFFSET + 4;

/// `struct inet_diag_sockid` fields for an address: the 16-byte address field (IPv4 in its
/// first 4 bytes) and the port, in network order.
fn diag_addr(a: SocketAddr) -> ([u8; 16], [u8; 2]) {
    let mut out = [0u8; 16];
    match canonical(a).ip() {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    (out, a.port().to_be_bytes())
}

/// The `SOCK_DIAG_BY_FAMILY` request for the one TCP socket whose local address is `peer` and
/// remote address `ours` (`inet_diag_req_v2`, established sockets only, no cookie). A peer that
/// closed before the lookup leaves a TIME_WAIT entry, which the kernel reports with uid 0 and no
/// inode: it belongs to nobody and must never pass for root's.
fn diag_request(peer: SocketAddr, ours: SocketAddr) -> Vec<u8> {
    let family = if canonical(peer).is_ipv4() { AF_INET } else { AF_INET6 };
    let (src, sport) = diag_addr(peer);
    let (dst, dport) = diag_addr(ours);
    let mut m = Vec::with_capacity(NLMSG_HDR + 56);
    m.extend_from_slice(&((NLMSG_HDR + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes()); // established only
    m.extend_from_slice(&sport);
    m.extend_from_slice(&dport);
    m.extend_from_slice(&src);
    m.extend_from_slice(&dst);
    m.extend_from_slice(&0u32.to_ne_bytes()); // interface
    m.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    m
}

/// The uid in the kernel's answer; `Ok(None)` when the kernel found no such socket.
fn diag_answer(a: &[u8]) -> std::io::Result<Option<u32>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "short sock_diag answer");
    let kind = u16::from_ne_bytes(a.get(4..6).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(a.get(16..20).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
        // ENOENT: no such socket. Anything else: netlink cannot answer here.
        return if errno == -2 { Ok(None) } else { Err(std::io::Error::from_raw_os_error(-errno)) };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad());
    }
    let word = |off: usize| -> std::io::Result<u32> {
        let at = NLMSG_HDR + off;
        Ok(u32::from_ne_bytes(a.get(at..at + 4).ok_or_else(bad)?.try_into().map_err(|_| bad())?))
    };
    let state = *a.get(NLMSG_HDR + STATE_OFFSET).ok_or_else(bad)?;
    // Only a live socket someone holds has an owner.
    if state != TCP_ESTABLISHED || word(INODE_OFFSET)? == 0 {
        return Ok(None);
    }
    Ok(Some(word(UID_OFFSET)?))
}

/// Asks sock_diag for the owner of the socket at `peer` connected to `ours`. Blocking, but the
/// kernel answers at once (the answer is queued before `send` returns).
fn sock_diag_uid(peer: SocketAddr, ours: SocketAddr) -> std::io::Result<Option<u32>> {
    use std::io::Read;
    let s = socket2::Socket::new(
        socket2::Domain::from(AF_NETLINK),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(NETLINK_SOCK_DIAG)),
    )?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    // An unbound, unconnected netlink socket sends to the kernel.
    s.send(&diag_request(peer, ours))?;
    let mut answer = [0u8; 1024];
    let n = (&s).read(&mut answer)?;
    diag_answer(&answer[..n])
}

/// The same from `/proc/net/tcp` and `/proc/net/tcp6`.
fn proc_table_uid(peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        if let Some(uid) = find_owner(&text, peer, ours) {
            return Some(uid);
        }
    }
    None
}

/// In one table's text, the uid of the established socket (state `01`, a non-zero inode: a
/// TIME_WAIT entry shows uid 0 and belongs to nobody) whose local address is `peer` and remote
/// `ours`.
fn find_owner(table: &str, peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    let (peer, ours) = (canonical(peer), canonical(ours));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, uid) = (parse_addr(f.get(1)?)?, parse_addr(f.get(2)?)?, f.get(7)?);
        let live = f.get(3) == Some(&"01") && f.get(9).is_some_and(|inode| *inode != "0");
        (live && canonical(local) == peer && canonical(remote) == ours).then(|| uid.parse().ok()).flatten()
    })
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel prints each 32-bit
/// word of the address as the number it is in this machine's byte order.
fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The listeners, for `--check`.
pub fn describe(listen: &Listen) -> String {
    let mut s = format!("unix socket {}", listen.socket_path().display());
    if let Some(t) = listen.tcp {
        s.push_str(&format!(", tcp {t} (loopback; same-user check through the kernel's socket table)"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_table_names_the_owner_of_a_connecting_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server_side, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(tcp_peer_uid(peer, listener.local_addr().unwrap()), Some(own_uid().unwrap()));
        // Our own side of the pair is not the peer's socket.
        assert_eq!(tcp_peer_uid(listener.local_addr().unwrap(), peer), Some(own_uid().unwrap()));
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(tcp_peer_uid(nobody, listener.local_addr().unwrap()), None);
        // Both ways of asking agree (sock_diag is allowed here).
        let ours = listener.local_addr().unwrap();
        assert_eq!(sock_diag_uid(peer, ours).unwrap(), proc_table_uid(peer, ours));
        assert_eq!(sock_diag_uid(nobody, ours).unwrap(), None);
        // IPv6 loopback too.
        if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
            let c6 = std::net::TcpStream::connect(l6.local_addr().unwrap()).unwrap();
            let (_s6, p6) = l6.accept().unwrap();
            assert_eq!(p6, c6.local_addr().unwrap());
            assert_eq!(sock_diag_uid(p6, l6.local_addr().unwrap()).unwrap(), Some(own_uid().unwrap()));
            assert_eq!(proc_table_uid(p6, l6.local_addr().unwrap()), Some(own_uid().unwrap()));
        }
    }

    #[test]
    fn table_lines_are_parsed_in_both_families() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 0100007F:D431 0100007F:1538 01 00000000:00000000 00:00000000 00000000  1001        0 1 1 0 20 4 30 10 -1\n";
        let peer: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        let ours: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(find_owner(v4, peer, ours), Some(1001));
            assert_eq!(find_owner(v4, ours, peer), None);
            // A peer that already closed: TIME_WAIT (06), uid 0, no inode: nobody's.
            let gone = v4.replace(" 01 ", " 06 ").replace("  1001        0 1 ", "     0        0 0 ");
            assert_eq!(find_owner(&gone, peer, ours), None);
        }
        let v6 = format!(
            "header\n 0: {}:D431 {}:1538 01 00000000:00000000 00:00000000 00000000  1002 0 1\n",
            "00000000000000000000000001000000", "00000000000000000000000001000000"
        );
        if cfg!(target_endian = "little") {
            assert_eq!(
                find_owner(&v6, "[::1]:54321".parse().unwrap(), "[::1]:5432".parse().unwrap()),
                Some(1002)
            );
        }
    }
}

#[cfg(test)]
mod socket_folder {
    use super::*;

    fn listen(dir: &std::path::Path) -> Listen {
        Listen { unix_dir: dir.join("run"), port: 5432, tcp: None, metrics: None, allow_uids: Vec::new() }
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_a_stale_one_replaced_and_the_folder_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let l = listen(dir.path());
        let own = own_uid().unwrap();
        let first = bind_unix(&l, own).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&l.unix_dir), mode(&l.socket_path())), (0o700, 0o600));
        assert_eq!(
            bind_unix(&l, own).unwrap_err().to_string(),
            format!("{}: another connector is listening there", l.socket_path().display())
        );
        drop(first);
        // The socket file is left behind, as after a crash: replaced.
        assert!(l.socket_path().exists());
        bind_unix(&l, own).unwrap();
    }

    #[tokio::test]
    async fn a_folder_another_user_owns_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = listen(dir.path());
        std::fs::create_dir(&l.unix_dir).unwrap();
        // As if it belonged to someone else: this process's uid plus one.
        let own = own_uid().unwrap();
        let e = bind_unix(&l, own + 1).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: belongs to uid {own}, not to this user ({})", l.unix_dir.display(), own + 1)
        );
    }
}
