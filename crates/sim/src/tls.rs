//! HTTPS like vLLM's OpenAI server: `--ssl-keyfile`, `--ssl-certfile`,
//! `--ssl-ca-certs` and `--ssl-cert-reqs` (0 none, 1 optional, 2 required,
//! as Python's `ssl.CERT_*`), over rustls. The agents of cloud instances
//! start their engine so, accepting only the router's and their own client
//! certificates.

use crate::{SimArgs, SimError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read(path: &Path, what: &str) -> Result<Vec<u8>, SimError> {
    std::fs::read(path)
        .map_err(|e| SimError::InvalidArgs(format!("cannot read {what} {}: {e}", path.display())))
}

/// The TLS server configuration the `--ssl-*` arguments ask for, or `None`
/// for plain HTTP.
pub(crate) fn server_config(args: &SimArgs) -> Result<Option<Arc<rustls::ServerConfig>>, SimError> {
    let (key, cert) = match (&args.ssl_keyfile, &args.ssl_certfile) {
        (None, None) => {
            if args.ssl_ca_certs.is_some() || args.ssl_cert_reqs != 0 {
                return Err(SimError::InvalidArgs(
                    "--ssl-ca-certs and --ssl-cert-reqs need --ssl-keyfile and --ssl-certfile"
                        .into(),
                ));
            }
            return Ok(None);
        }
        (Some(k), Some(c)) => (k, c),
        _ => {
            return Err(SimError::InvalidArgs(
                "--ssl-keyfile and --ssl-certfile go together".into(),
            ))
        }
    };
    let bad = |what: &str, e: &dyn std::fmt::Display| SimError::InvalidArgs(format!("{what}: {e}"));
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(cert, "--ssl-certfile")?)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("--ssl-certfile", &e))?;
    let key = PrivateKeyDer::from_pem_slice(&read(key, "--ssl-keyfile")?)
        .map_err(|e| bad("--ssl-keyfile", &e))?;
    // Ignore "already installed": another part of the process did it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS", &e))?;
    let builder = match (args.ssl_cert_reqs, &args.ssl_ca_certs) {
        (0, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(SimError::InvalidArgs(
                "--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs".into(),
            ))
        }
        (reqs, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(ca, "--ssl-ca-certs")?) {
                roots
                    .add(c.map_err(|e| bad("--ssl-ca-certs", &e))?)
                    .map_err(|e| bad("--ssl-ca-certs", &e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
            let verifier = if reqs == 1 {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder
                .with_client_cert_verifier(verifier.build().map_err(|e| bad("--ssl-ca-certs", &e))?)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("--ssl-certfile/--ssl-keyfile", &e))?;
    Ok(Some(Arc::new(config)))
}

/// A listener whose connections have passed their TLS handshake. Handshakes
/// run in tasks of their own, so a slow or silent client holds up no other.
pub(crate) struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub(crate) fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let sender = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = sender.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Self { local, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended (it never does while we listen).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[tokio::test]
    async fn serves_https_and_requires_client_certificates_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let server = rcgen::generate_simple_self_signed(vec!["gpufleet-engine".into()]).unwrap();
        let client = rcgen::generate_simple_self_signed(vec!["client".into()]).unwrap();
        let mut args = SimArgs::for_tests("m");
        args.ssl_keyfile = Some(write(
            dir.path(),
            "key.pem",
            &server.signing_key.serialize_pem(),
        ));
        args.ssl_certfile = Some(write(dir.path(), "cert.pem", &server.cert.pem()));
        args.ssl_ca_certs = Some(write(dir.path(), "clients.pem", &client.cert.pem()));
        args.ssl_cert_reqs = 2;
        let sim = crate::SimServer::bind(args).await.unwrap();
        let addr = sim.local_addr();
        tokio::spawn(sim.serve(std::future::pending()));

        let root = reqwest::Certificate::from_pem(server.cert.pem().as_bytes()).unwrap();
        let base = || {
            reqwest::Client::builder()
                .add_root_certificate(root.clone())
                .tls_built_in_root_certs(false)
                .resolve("gpufleet-engine", addr)
                .timeout(Duration::from_secs(5))
        };
        let url = format!("https://gpufleet-engine:{}/v1/models", addr.port());
        let pem = format!(
            "{}{}",
            client.cert.pem(),
            client.signing_key.serialize_pem()
        );
        let with_cert = base()
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        let r = with_cert.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("\"m\""));

        let without = base().build().unwrap();
        assert!(
            without.get(&url).send().await.is_err(),
            "no client certificate: refused"
        );
        let plain = reqwest::Client::new();
        assert!(
            plain
                .get(format!("http://{addr}/v1/models"))
                .send()
                .await
                .is_err(),
            "plain HTTP gets no answer"
        );
        // And the server still serves after those.
        assert_eq!(with_cert.get(&url).send().await.unwrap().status(), 200);
    }

    #[test]
    fn ssl_arguments_go_together() {
        let mut a = SimArgs::for_tests("m");
        a.ssl_cert_reqs = 2;
        assert!(server_config(&a).is_err());
        let mut a = SimArgs::for_tests("m");
        a.ssl_keyfile = Some("/nonexistent".into());
        assert!(server_config(&a).is_err());
        assert!(server_config(&SimArgs::for_tests("m")).unwrap().is_none());
    }
}
