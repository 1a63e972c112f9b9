//! The HTTPS listener of `up` for its public URL: cloud machines' agents
//! (and anyone else) reach the control plane there over TLS.
//!
//! With a certificate and key given (`[tls] cert_file/key_file`), those are
//! served. Otherwise a self-signed certificate for the public URL's host is
//! made once and kept in `<data_dir>/tls/` (key mode 0600); agents pin it:
//! it travels in their bootstrap and they trust it alone.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `[tls]` of the config file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Address of the HTTPS listener. Empty: `0.0.0.0:<port of public_url>`
    /// when `public_url` is `https://`; `off`: no HTTPS listener (a proxy in
    /// front of `listen` terminates TLS).
    pub listen: String,
    /// PEM certificate chain served. Empty (with `key_file` empty): a
    /// self-signed certificate for the public URL's host, pinned by agents.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// PEM certificate agents pin instead of trusting the system's roots
    /// (for a private authority). Empty: the self-signed one when made, else
    /// none.
    pub pin_file: String,
}

/// What the HTTPS listener serves, and what agents must pin.
pub struct PublicTls {
    pub listen: SocketAddr,
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate agents trust alone, if any.
    pub pin_pem: Option<String>,
}

impl TlsSection {
    /// The HTTPS listener for `public_url`, or `None` when there is none
    /// (no public URL, a plain `http://` one, or `listen = "off"`).
    pub fn resolve(&self, public_url: &str, data_dir: &Path) -> anyhow::Result<Option<PublicTls>> {
        let Some(rest) = public_url.strip_prefix("https://") else {
            return Ok(None);
        };
        if self.listen == "off" {
            let pin_pem = read_optional(&self.pin_file)?;
            return Ok(pin_pem.map(|pin| PublicTls {
                listen: SocketAddr::from(([0, 0, 0, 0], 0)),
                cert_pem: String::new(),
                key_pem: String::new(),
                pin_pem: Some(pin),
            }));
        }
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = split_authority(authority)
            .with_context(|| format!("--public-url {public_url:?} has no host"))?;
        let listen = if self.listen.is_empty() {
            SocketAddr::from(([0, 0, 0, 0], port))
        } else {
            self.listen
                .parse()
                .with_context(|| format!("[tls] listen = {:?} is not an address", self.listen))?
        };
        let (cert_pem, key_pem, generated) = match (self.cert_file.as_str(), self.key_file.as_str())
        {
            ("", "") => {
                let (c, k) = self_signed(host, &data_dir.join("tls"))?;
                (c, k, true)
            }
            ("", _) | (_, "") => {
                anyhow::bail!("[tls] cert_file and key_file go together: set both, or neither for a self-signed certificate")
            }
            (c, k) => (read(c)?, read(k)?, false),
        };
        let pin_pem = match read_optional(&self.pin_file)? {
            Some(pin) => Some(pin),
            None if generated => Some(cert_pem.clone()),
            None => None,
        };
        Ok(Some(PublicTls {
            listen,
            cert_pem,
            key_pem,
            pin_pem,
        }))
    }
}

impl PublicTls {
    /// Whether an HTTPS listener is to run (not with `listen = "off"`).
    pub fn serves(&self) -> bool {
        !self.cert_pem.is_empty()
    }
}

/// `host[:port]` or `[v6][:port]`, port 443 by default.
fn split_authority(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, rest) = v6.split_once(']')?;
        (h, rest.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 443,
    };
    (!host.is_empty()).then_some((host, port))
}

fn read(path: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))
}

fn read_optional(path: &str) -> anyhow::Result<Option<String>> {
    if path.is_empty() {
        Ok(None)
    } else {
        read(path).map(Some)
    }
}

/// The self-signed certificate for `host` kept in `dir`, made on first use
/// (or when it was made for another host).
fn self_signed(host: &str, dir: &Path) -> anyhow::Result<(String, String)> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let host_path = dir.join("host");
    if let (Ok(cert), Ok(key), Ok(made_for)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
        std::fs::read_to_string(&host_path),
    ) {
        if made_for.trim() == host {
            return Ok((cert, key));
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let certified = rcgen::generate_simple_self_signed(vec![host.to_string()])
        .context("cannot make a self-signed certificate")?;
    let cert = certified.cert.pem();
    let key = certified.signing_key.serialize_pem();
    write_private(&key_path, &key)?;
    std::fs::write(&cert_path, &cert)
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    std::fs::write(&host_path, host)
        .with_context(|| format!("cannot write {}", host_path.display()))?;
    tracing::info!(host, path = %cert_path.display(), "made a self-signed TLS certificate; agents pin it");
    Ok((cert, key))
}

/// The router's client identity for engines of machines off this host
/// (mutual TLS): a self-signed certificate and key made once and kept in
/// `<data_dir>/tls/router-client.pem` (key mode 0600). Engines are handed
/// the certificate (through their agent) and accept only it.
pub fn router_client_identity(data_dir: &Path) -> anyhow::Result<(String, String)> {
    let dir = data_dir.join("tls");
    let cert_path = dir.join("router-client.pem");
    let key_path = dir.join("router-client-key.pem");
    if let (Ok(cert), Ok(key)) = (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let certified = rcgen::generate_simple_self_signed(vec!["gpufleet-router".to_string()])
        .context("cannot make the router's client certificate")?;
    let cert = certified.cert.pem();
    let key = certified.signing_key.serialize_pem();
    write_private(&key_path, &key)?;
    std::fs::write(&cert_path, &cert)
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    tracing::info!(path = %cert_path.display(), "made the router's client certificate for engines (mutual TLS)");
    Ok((cert, key))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Serve `router` over TLS until `shutdown` completes.
pub async fn serve(
    tls: &PublicTls,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        tls.cert_pem.clone().into_bytes(),
        tls.key_pem.clone().into_bytes(),
    )
    .await
    .context("invalid TLS certificate or key")?;
    let listener = std::net::TcpListener::bind(tls.listen)
        .with_context(|| format!("cannot listen on {} (HTTPS)", tls.listen))?;
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    let server = axum_server::from_tcp_rustls(listener, config)?
        .handle(handle)
        .serve(router.into_make_service());
    Ok(tokio::spawn(server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(
            split_authority("fleet.example.com"),
            Some(("fleet.example.com", 443))
        );
        assert_eq!(split_authority("127.0.0.1:8443"), Some(("127.0.0.1", 8443)));
        assert_eq!(split_authority("[::1]:9"), Some(("::1", 9)));
        assert_eq!(split_authority(":9"), None);
        assert_eq!(split_authority("h:x"), None);
    }

    #[test]
    fn a_self_signed_certificate_is_made_once_per_host_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let t = TlsSection::default();
        assert!(t.resolve("http://x", dir.path()).unwrap().is_none());
        let a = t
            .resolve("https://127.0.0.1:8443/", dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(a.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(a.pin_pem.as_deref(), Some(a.cert_pem.as_str()));
        let mode = std::fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        let again = t
            .resolve("https://127.0.0.1:8443", dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(again.cert_pem, a.cert_pem, "kept across restarts");
        let other = t
            .resolve("https://fleet.example.com", dir.path())
            .unwrap()
            .unwrap();
        assert_ne!(other.cert_pem, a.cert_pem, "made anew for another host");
        let half = TlsSection {
            cert_file: "/x".into(),
            ..TlsSection::default()
        };
        assert!(half.resolve("https://h", dir.path()).is_err());
    }

    #[test]
    fn the_router_client_identity_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = router_client_identity(dir.path()).unwrap();
        assert!(c.contains("BEGIN CERTIFICATE") && k.contains("PRIVATE KEY"));
        let mode = std::fs::metadata(dir.path().join("tls/router-client-key.pem"))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        assert_eq!(router_client_identity(dir.path()).unwrap(), (c, k));
    }
}
