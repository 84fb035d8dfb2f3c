//! systemd's readiness protocol (sd_notify(3)): one datagram to the Unix socket named by
//! `$NOTIFY_SOCKET`, a path or, with a leading `@`, an abstract name. Without the variable
//! (not started by systemd with `Type=notify`) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Tells the service manager `state` (`READY=1`, `STOPPING=1`) if one asked for it; a failure
/// is logged and otherwise ignored (the service runs on).
pub fn notify(state: &str) {
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        if let Err(e) = send(&socket, state) {
            tracing::warn!(error = %e, state, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }
}

/// Sends `state` to the notification socket `socket` (as `$NOTIFY_SOCKET` names it).
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let bytes = socket.as_bytes();
    let addr = match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])?
        }
        Some(b'/') => SocketAddr::from_pathname(socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "NOTIFY_SOCKET is neither a path nor an abstract name (@...)",
            ))
        }
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("gprxy-notify-test-{}", std::process::id());
        let abstract_listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        send(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn refuses_other_addresses_and_a_missing_socket() {
        let e = send(OsStr::new("vsock:2:1234"), "READY=1").unwrap_err();
        assert_eq!(e.to_string(), "NOTIFY_SOCKET is neither a path nor an abstract name (@...)");
        let e = send(OsStr::new("/nonexistent/gprxy-notify"), "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
