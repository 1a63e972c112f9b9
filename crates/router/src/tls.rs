//! Mutual TLS to the engines of instances off the control plane's host.
//!
//! Each such engine serves a certificate its agent made (reported through
//! `POST /internal/v1/agent/engine-cert`, kept on the instance) for the DNS
//! name [`ENGINE_TLS_SERVER_NAME`]; the router connects to the engine's IP,
//! trusts that certificate alone and presents its own client identity, which
//! the engine requires. Engines of machines on this host (Mock) speak plain
//! HTTP on loopback and never come here.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;

pub use gpufleet_proto::ENGINE_TLS_SERVER_NAME;

/// The router's client certificate and key (PEM), which engines accept.
#[derive(Clone)]
pub struct EngineClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for EngineClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineClientIdentity")
            .field("key_pem", &"***")
            .finish_non_exhaustive()
    }
}

/// How to reach one engine over TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The client configuration for an engine serving `engine_cert_pem`:
/// that certificate as the only root, `identity` as the client's.
pub fn client_config(
    engine_cert_pem: &str,
    identity: &EngineClientIdentity,
) -> Result<UpstreamTls, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(engine_cert_pem.as_bytes()) {
        let c = c.map_err(|e| format!("engine certificate: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("engine certificate: {e}"))?;
        n += 1;
    }
    if n == 0 {
        return Err("engine certificate: no certificate in the PEM".into());
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("router client certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| format!("router client key: {e}"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("router client identity: {e}"))?;
    Ok(UpstreamTls {
        config: Arc::new(config),
        server_name: ServerName::try_from(ENGINE_TLS_SERVER_NAME)
            .expect("a valid DNS name")
            .to_owned(),
    })
}
