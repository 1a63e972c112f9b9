//! Looking at and signalling a machine's processes through `/proc` (Linux).
//!
//! A machine's processes are its agent's process group plus any process that
//! carries the machine's marker in its environment ([`MACHINE_ENV`]; children
//! inherit it, so even a child that left the group with `setsid` is found).

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::fs;

/// Environment variable set on every agent: `GPUFLEET_MOCK_MACHINE_ID=<machine id>`.
pub const MACHINE_ENV: &str = "GPUFLEET_MOCK_MACHINE_ID";

/// The fields of `/proc/<pid>/stat` we need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    pgrp: i32,
}

impl Stat {
    /// Zombies (`Z`) and dead tasks (`X`) run no code any more.
    fn is_running(self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

fn read_stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; comm may contain spaces and ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Stat { state, pgrp })
}

/// NUL-separated entries of `/proc/<pid>/<file>` (`cmdline`, `environ`).
fn proc_entries(pid: i32, file: &str) -> Vec<Vec<u8>> {
    match fs::read(format!("/proc/{pid}/{file}")) {
        Ok(bytes) => bytes.split(|b| *b == 0).map(<[u8]>::to_vec).collect(),
        Err(_) => Vec::new(),
    }
}

fn has_arg(pid: i32, arg: &str) -> bool {
    proc_entries(pid, "cmdline")
        .iter()
        .any(|a| a == arg.as_bytes())
}

/// Whether `pid` is a running process (not a zombie) whose command line has
/// `instance_id` as one of its arguments, which guards against pid reuse.
pub fn agent_alive(pid: i32, instance_id: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    match kill(Pid::from_raw(pid), None) {
        Ok(()) => {}
        // EPERM: someone else's process, so not our agent.
        Err(_) => return false,
    }
    has_arg(pid, instance_id) && read_stat(pid).is_some_and(Stat::is_running)
}

/// The running processes of one machine at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineProcesses {
    /// The agent's process group, when it still has members and they are this machine's.
    pub group: Option<i32>,
    /// Every running process of the machine (group members and marked processes).
    pub pids: Vec<i32>,
    /// Marked processes outside `group`, which a group signal does not reach.
    outside_group: Vec<i32>,
}

impl MachineProcesses {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    /// Sends `signal` to the group and to every marked process outside it.
    /// Processes that are gone already are no error.
    pub fn signal(&self, signal: Signal) -> Result<(), Errno> {
        let ignore_gone = |r: Result<(), Errno>| match r {
            Err(Errno::ESRCH) => Ok(()),
            other => other,
        };
        let mut result = Ok(());
        if let Some(pgid) = self.group {
            result = result.and(ignore_gone(killpg(Pid::from_raw(pgid), signal)));
        }
        for pid in &self.outside_group {
            result = result.and(ignore_gone(kill(Pid::from_raw(*pid), signal)));
        }
        result
    }
}

/// One running process, as a [`ProcTable`] saw it.
#[derive(Debug, Clone)]
struct ProcEntry {
    pid: i32,
    pgrp: i32,
    /// The value of its [`MACHINE_ENV`] variable, if any.
    machine: Option<String>,
}

/// Every running process of this host at one instant, read once so that
/// many machines can be looked at without reading `/proc` for each.
#[derive(Debug, Clone, Default)]
pub struct ProcTable {
    procs: Vec<ProcEntry>,
}

impl ProcTable {
    pub fn scan() -> Self {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Self::default();
        };
        let prefix = format!("{MACHINE_ENV}=");
        let mut procs = Vec::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Some(stat) = read_stat(pid) else { continue };
            if !stat.is_running() {
                continue;
            }
            let machine = proc_entries(pid, "environ").into_iter().find_map(|e| {
                e.strip_prefix(prefix.as_bytes())
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            procs.push(ProcEntry {
                pid,
                pgrp: stat.pgrp,
                machine,
            });
        }
        Self { procs }
    }

    /// The running processes of machine `machine_id`, whose agent led
    /// process group `pgid` (if it was ever spawned).
    ///
    /// Group members count only if the caller knows the group is the
    /// machine's (`group_known_ours`: its leader is our live child) or one of
    /// them shows it (the marker, or `instance_id` on its command line): once
    /// every member of a group is gone, its id may be reused by an unrelated
    /// process.
    pub fn machine(
        &self,
        machine_id: &str,
        instance_id: &str,
        pgid: Option<i32>,
        group_known_ours: bool,
    ) -> MachineProcesses {
        let pgid = pgid.filter(|g| *g > 0);
        let marked = |p: &ProcEntry| p.machine.as_deref() == Some(machine_id);
        let members: Vec<&ProcEntry> = self.procs.iter().filter(|p| Some(p.pgrp) == pgid).collect();
        let group_is_ours = !members.is_empty()
            && (group_known_ours
                || members
                    .iter()
                    .any(|p| marked(p) || has_arg(p.pid, instance_id)));
        let outside_group: Vec<i32> = self
            .procs
            .iter()
            .filter(|p| Some(p.pgrp) != pgid && marked(p))
            .map(|p| p.pid)
            .collect();
        let mut pids = outside_group.clone();
        if group_is_ours {
            pids.extend(members.iter().map(|p| p.pid));
        }
        pids.sort_unstable();
        MachineProcesses {
            group: pgid.filter(|_| group_is_ours),
            pids,
            outside_group,
        }
    }
}

/// [`ProcTable::machine`] on a fresh scan.
pub fn machine_processes(
    machine_id: &str,
    instance_id: &str,
    pgid: Option<i32>,
    group_known_ours: bool,
) -> MachineProcesses {
    ProcTable::scan().machine(machine_id, instance_id, pgid, group_known_ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_only_with_a_matching_argument() {
        let me = std::process::id() as i32;
        let arg0 = std::env::args().next().expect("argv[0]");
        assert!(agent_alive(me, &arg0));
        assert!(!agent_alive(me, "i-not-in-my-command-line"));
        assert!(!agent_alive(0, &arg0));
        assert!(!agent_alive(-1, &arg0));
    }

    #[test]
    fn reads_our_own_stat() {
        let me = std::process::id() as i32;
        let stat = read_stat(me).expect("own stat");
        assert!(stat.is_running());
        assert_eq!(stat.pgrp, nix::unistd::getpgrp().as_raw());
    }

    #[test]
    fn an_unmarked_group_is_not_ours() {
        let pgrp = nix::unistd::getpgrp().as_raw();
        let procs = machine_processes("mock-000000000000", "i-nothing", Some(pgrp), false);
        assert_eq!(procs, MachineProcesses::default());
        assert!(procs.is_empty());
    }

    #[test]
    fn a_table_finds_marked_processes_and_verified_groups() {
        let table = ProcTable {
            procs: vec![
                ProcEntry {
                    pid: 10,
                    pgrp: 10,
                    machine: Some("mock-a".into()),
                },
                ProcEntry {
                    pid: 11,
                    pgrp: 10,
                    machine: None,
                },
                ProcEntry {
                    pid: 20,
                    pgrp: 20,
                    machine: Some("mock-a".into()),
                },
                ProcEntry {
                    pid: 30,
                    pgrp: 30,
                    machine: None,
                },
                ProcEntry {
                    pid: 40,
                    pgrp: 40,
                    machine: Some("mock-b".into()),
                },
            ],
        };
        let a = table.machine("mock-a", "i-x", Some(10), false);
        assert_eq!(a.group, Some(10));
        assert_eq!(
            a.pids,
            vec![10, 11, 20],
            "a setsid'd child is still found by its marker"
        );
        assert_eq!(a.outside_group, vec![20]);
        let reused = table.machine("mock-c", "i-x", Some(30), false);
        assert_eq!(
            reused,
            MachineProcesses::default(),
            "an unmarked group is someone else's"
        );
        let known = table.machine("mock-c", "i-x", Some(30), true);
        assert_eq!(known.pids, vec![30]);
        let gone = table.machine("mock-c", "i-x", Some(99), true);
        assert!(gone.is_empty());
        assert_eq!(gone.group, None);
    }
}
