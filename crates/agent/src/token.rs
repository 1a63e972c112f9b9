//! The per-instance token, kept in `<data-dir>/agent-token` (mode 0600,
//! written atomically: temporary file in the same directory, then rename).

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot {action} token file {path}")]
pub struct TokenFileError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Reads the stored token, if any (an empty file counts as none).
pub fn load(path: &Path) -> Result<Option<String>, TokenFileError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let token = s.trim().to_string();
            Ok((!token.is_empty()).then_some(token))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenFileError {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the token atomically with mode 0600.
pub fn persist(path: &Path, token: &str) -> Result<(), TokenFileError> {
    let err = |action| {
        let path = path.to_path_buf();
        move |source| TokenFileError {
            action,
            path,
            source,
        }
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    // NamedTempFile is created with mode 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".agent-token.")
        .tempfile_in(dir)
        .map_err(err("create a temporary file for the"))?;
    tmp.write_all(token.as_bytes()).map_err(err("write"))?;
    tmp.as_file().sync_all().map_err(err("sync"))?;
    tmp.persist(path)
        .map_err(|e| err("rename into place the")(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn persists_with_mode_0600_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent-token");
        assert_eq!(load(&path).expect("load"), None);
        persist(&path, "tok-1").expect("persist");
        persist(&path, "tok-2").expect("overwrite");
        assert_eq!(load(&path).expect("load").as_deref(), Some("tok-2"));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers = std::fs::read_dir(dir.path()).expect("ls").count();
        assert_eq!(leftovers, 1, "no temporary files left");
    }
}
