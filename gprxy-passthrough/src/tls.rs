//! TLS for clients (termination, ALPN `postgresql`) and for the upstream server (verified).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol name PostgreSQL uses (libpq 17+ requires it for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate", path.display());
    Ok(certs)
}

/// The server side for clients.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = certs(cert)?;
    let pem = std::fs::read(key).context("cannot read the private key file")?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| "bad key PEM".to_string())?
        .context("no private key in the key file")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not match")?;
    cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    // libpq never resumes a session (PostgreSQL itself turns tickets and its session cache off):
    // tickets would cost a record and a round of wake-ups per connection for nothing.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// The client side for the upstream server: its certificate must chain to `ca_file`.
pub fn upstream_config(ca_file: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    client_config(ca_file, None)
}

/// [`upstream_config`] with a client certificate chain and key (libpq's `sslcert`/`sslkey`).
pub fn client_config(
    ca_file: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_file)? {
        roots.add(c).context("bad CA certificate")?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut cfg = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let pem = std::fs::read(key).context("cannot read the private key file")?;
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
                .with_context(|| "bad key PEM".to_string())?
                .context("no private key in the key file")?;
            builder.with_client_auth_cert(chain, key).context("client certificate and key do not match")?
        }
    };
    cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves every pending TLS record from one side to the other; returns the bytes moved.
    fn transfer(
        from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
        to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    ) -> usize {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut read = &wire[..];
        while !read.is_empty() {
            to.read_tls(&mut read).unwrap();
            to.process_new_packets().unwrap();
        }
        wire.len()
    }

    #[test]
    fn server_offers_alpn_and_sends_no_session_tickets() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = gprxy_core::testkit::test_ca();
        let (ca_path, cert_path, key_path) =
            (dir.path().join("ca"), dir.path().join("c"), dir.path().join("k"));
        std::fs::write(&ca_path, ca).unwrap();
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let server_cfg = server_config(&cert_path, &key_path).unwrap();
        let client_cfg = upstream_config(&ca_path).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client_cfg, name).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        transfer(&mut client, &mut server); // ClientHello
        transfer(&mut server, &mut client); // ServerHello .. Finished
        transfer(&mut client, &mut server); // client Finished
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert_eq!(server.alpn_protocol(), Some(ALPN_POSTGRESQL));
        // After the client's Finished a TLS 1.3 server would send its NewSessionTickets.
        assert_eq!(transfer(&mut server, &mut client), 0, "the server sent records after the handshake");
    }
}
