//! SQLite serves one control-plane replica: `up` holds an advisory lock on
//! `<database file>.lock` while it runs, and a second `up` on the same file
//! is refused with a message naming the fix.

use anyhow::bail;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Take the lock for the SQLite database `db`; held until the file drops.
pub fn lock_sqlite(db: &Path) -> anyhow::Result<File> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::WouldBlock {
            bail!(
                "another `gpufleet up` is already using the SQLite database {} (SQLite serves one \
                 replica). Stop it, or run several replicas on PostgreSQL: \
                 --database postgres://USER@HOST/DB",
                db.display()
            );
        }
        bail!("cannot lock {}: {err}", path.display());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gpufleet.db");
        let first = lock_sqlite(&db).unwrap();
        let err = lock_sqlite(&db).unwrap_err().to_string();
        assert!(err.contains("PostgreSQL"), "{err}");
        assert!(err.contains("gpufleet.db"), "{err}");
        drop(first);
        lock_sqlite(&db).unwrap();
    }
}
