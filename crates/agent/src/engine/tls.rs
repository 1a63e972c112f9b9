//! Mutual TLS for the engine of a machine off the control plane's host.
//!
//! On a grant in the engine's environment ([`gpufleet_proto::EngineTlsGrant`])
//! the agent makes a key and a self-signed certificate for the engine (DNS
//! name [`ENGINE_TLS_SERVER_NAME`]) and a client certificate of its own, and
//! writes them to `<data_dir>/engine-tls/`: `key.pem` (0600), `cert.pem` and
//! `clients.pem` (the router's certificate from the grant, then the agent's:
//! the engine accepts those two clients only). The engine is started with
//! vLLM's `--ssl-*` flags over these files; the agent reports `cert.pem` to
//! the control plane (the router trusts it alone) and probes the engine over
//! https with its client certificate.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use gpufleet_proto::{EngineTlsGrant, ENGINE_TLS_SERVER_NAME};

/// Where the engine's TLS files lie, under the agent's data directory.
pub const DIR: &str = "engine-tls";

/// The engine's TLS files (paths on this machine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTlsFiles {
    /// The directory holding the three files (mounted into a container).
    pub dir: PathBuf,
    pub key: PathBuf,
    pub cert: PathBuf,
    /// Certificates of the clients the engine accepts.
    pub clients: PathBuf,
}

impl EngineTlsFiles {
    pub fn in_dir(dir: PathBuf) -> Self {
        Self {
            key: dir.join("key.pem"),
            cert: dir.join("cert.pem"),
            clients: dir.join("clients.pem"),
            dir,
        }
    }
}

/// What the agent needs to talk to its engine over TLS.
#[derive(Clone)]
pub struct EngineTls {
    pub files: EngineTlsFiles,
    /// The engine's certificate (reported to the control plane).
    pub cert_pem: String,
    /// The agent's client certificate then key (PEM), for its probes.
    pub client_identity_pem: String,
}

impl std::fmt::Debug for EngineTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot make a certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the grant carries no PEM certificate")]
    BadGrant,
}

/// Make the engine's key and certificate and the agent's client identity,
/// and write the engine's files under `data_dir` (anew at every start: the
/// certificate is reported again before the engine starts).
pub fn prepare(data_dir: &Path, grant: &EngineTlsGrant) -> Result<EngineTls, TlsSetupError> {
    if !grant.client_ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(TlsSetupError::BadGrant);
    }
    let engine = rcgen::generate_simple_self_signed(vec![ENGINE_TLS_SERVER_NAME.to_string()])?;
    let agent = rcgen::generate_simple_self_signed(vec!["gpufleet-agent".to_string()])?;
    let dir = data_dir.join(DIR);
    std::fs::create_dir_all(&dir).map_err(|source| TlsSetupError::Write {
        path: dir.clone(),
        source,
    })?;
    let files = EngineTlsFiles::in_dir(dir);
    let cert_pem = engine.cert.pem();
    let agent_cert = agent.cert.pem();
    let mut clients = grant.client_ca_pem.trim_end().to_string();
    clients.push('\n');
    clients.push_str(&agent_cert);
    write(&files.key, &engine.signing_key.serialize_pem(), 0o600)?;
    write(&files.cert, &cert_pem, 0o644)?;
    write(&files.clients, &clients, 0o644)?;
    Ok(EngineTls {
        files,
        cert_pem,
        client_identity_pem: format!("{agent_cert}{}", agent.signing_key.serialize_pem()),
    })
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), TlsSetupError> {
    let err = |source| TlsSetupError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Replace, so that the mode of a fresh file applies.
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_are_written_with_the_grant_and_the_agent_as_clients() {
        let dir = tempfile::tempdir().unwrap();
        let router = rcgen::generate_simple_self_signed(vec!["r".into()]).unwrap();
        let grant = EngineTlsGrant {
            client_ca_pem: router.cert.pem(),
        };
        let t = prepare(dir.path(), &grant).unwrap();
        assert_eq!(t.files.dir, dir.path().join("engine-tls"));
        let mode = std::fs::metadata(&t.files.key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&t.files.cert).unwrap(), t.cert_pem);
        let clients = std::fs::read_to_string(&t.files.clients).unwrap();
        assert!(clients.starts_with(&router.cert.pem().trim_end().to_string()));
        assert_eq!(clients.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(clients.contains(
            t.client_identity_pem
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
        ));
        // Made anew on the next start.
        let again = prepare(dir.path(), &grant).unwrap();
        assert_ne!(again.cert_pem, t.cert_pem);
        assert!(prepare(dir.path(), &EngineTlsGrant::default()).is_err());
    }
}
