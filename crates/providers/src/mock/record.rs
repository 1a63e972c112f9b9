//! What the Mock provider persists about a machine: `machine.json` in the
//! machine's directory, always replaced atomically (temp file + rename).

use crate::MachineState;
use chrono::{DateTime, Utc};
use gpufleet_domain::{InstanceId, ProviderInstanceId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const RECORD_FILE: &str = "machine.json";
pub const BOOTSTRAP_FILE: &str = "bootstrap.json";
pub const LOG_FILE: &str = "agent.log";

/// One machine, as `machine.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: ProviderInstanceId,
    /// gpufleet's instance id (from the bootstrap); on the agent's command line.
    pub instance_id: InstanceId,
    pub idempotency_key: String,
    pub tags: BTreeMap<String, String>,
    pub zone: String,
    pub instance_type: String,
    pub ip: Ipv4Addr,
    /// `Pending` until the agent is first spawned, `Running` after,
    /// `Stopping` once termination began.
    pub state: MachineState,
    pub created_at: DateTime<Utc>,
    /// The current (or last) agent process.
    pub agent_pid: Option<i32>,
    /// Its process group (equal to `agent_pid`: the agent leads its group).
    pub agent_pgid: Option<i32>,
    /// Whether an agent was ever spawned for this machine.
    pub spawned: bool,
    /// How many times an agent was spawned.
    #[serde(default)]
    pub spawn_count: u32,
    /// The machine is gone: its processes are dead and its IP is free.
    pub deleted: bool,
    #[serde(default)]
    pub deleted_at: Option<DateTime<Utc>>,
}

/// Writes `bytes` to `path` atomically, with permission `mode` from the start.
///
/// Atomic against a crash of this process (readers see the old or the new
/// file, never half of one). Not fsynced: the machines are processes of this
/// host and do not outlive a power loss either.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    // A stale temp file from a crash would keep its old mode.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Why a machine directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid machine record")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Loads every `machines/*/machine.json`. Directories without one are
/// leftovers of a create that failed before its commit point and are skipped.
pub fn load_all(machines_dir: &Path) -> Result<Vec<MachineRecord>, LoadError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    let mut records = Vec::new();
    for entry in fs::read_dir(machines_dir).map_err(io_err(machines_dir))? {
        let entry = entry.map_err(io_err(machines_dir))?;
        let path = entry.path().join(RECORD_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(dir = %entry.path().display(), "skipping machine directory without a record");
                continue;
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let record =
            serde_json::from_slice(&bytes).map_err(|source| LoadError::Parse { path, source })?;
        records.push(record);
    }
    records.sort_by(|a: &MachineRecord, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret.json");
        write_atomic(&path, b"one", 0o600).expect("first write");
        write_atomic(&path, b"two", 0o600).expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let mode = fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["secret.json"], "no temp file is left behind");
    }
}
