//! The admin token: from `GPUFLEET_ADMIN_TOKEN`, or a file (mode 0600) that
//! `up` creates with a fresh random token. The token itself is never logged.

use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Prefix of generated admin tokens.
pub const PREFIX: &str = "gfa_";

/// Where the admin token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Environment,
    /// Read from an existing file.
    File(PathBuf),
    /// Freshly generated and written to this file.
    Generated(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Environment => f.write_str("from $GPUFLEET_ADMIN_TOKEN"),
            Self::File(p) => write!(f, "in {}", p.display()),
            Self::Generated(p) => write!(f, "in {} (newly generated)", p.display()),
        }
    }
}

/// A new random token: `gfa_` and 32 random bytes in hex.
pub fn generate() -> String {
    format!("{PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// Reads a token file; `None` when it does not exist or is empty.
pub fn read(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            Err(e).with_context(|| format!("cannot read admin token file {}", path.display()))
        }
    }
}

/// `env_token` if set, else the token in `path`, else a new one written to `path`.
pub fn resolve(env_token: Option<String>, path: &Path) -> anyhow::Result<(String, TokenSource)> {
    if let Some(t) = env_token
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
    {
        return Ok((t, TokenSource::Environment));
    }
    if let Some(t) = read(path)? {
        warn_if_readable_by_others(path);
        return Ok((t, TokenSource::File(path.to_path_buf())));
    }
    let token = generate();
    write_new(path, &token)?;
    Ok((token, TokenSource::Generated(path.to_path_buf())))
}

fn write_new(path: &Path, token: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write admin token file {}", path.display()))
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "admin token file is readable by other users; chmod 600 it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reads_back_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin-token");
        let (t1, s1) = resolve(None, &path).unwrap();
        assert!(
            t1.starts_with(PREFIX) && t1.len() == PREFIX.len() + 64,
            "{t1}"
        );
        assert_eq!(s1, TokenSource::Generated(path.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (t2, s2) = resolve(None, &path).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(s2, TokenSource::File(path.clone()));
        let (t3, s3) = resolve(Some("from-env".into()), &path).unwrap();
        assert_eq!((t3.as_str(), s3), ("from-env", TokenSource::Environment));
    }
}
