//! What exists: servers, flexible IPs, block volumes, security groups, and
//! their JSON as the real API renders it (field sets from recorded answers).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use crate::vm::Vms;

/// Instance API date format: `2026-07-30T12:55:26.060198+00:00`.
pub fn instance_date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

/// Block API date format: `2026-07-30T12:55:26.162018Z`.
pub fn block_date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

pub struct IpPool {
    base: u32,
    size: u32,
    cursor: u32,
}

impl IpPool {
    pub fn parse(cidr: &str) -> Option<IpPool> {
        let (addr, len) = cidr.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u32 = len.parse().ok()?;
        if !(8..=30).contains(&len) {
            return None;
        }
        let size = 1u32 << (32 - len);
        let base = u32::from(addr) & !(size - 1);
        Some(IpPool {
            base,
            size,
            cursor: 0,
        })
    }

    /// The next address not in `used`, round robin (so a freed address is not
    /// handed out again at once); skips the network and broadcast addresses.
    fn take(&mut self, used: &BTreeSet<String>) -> Option<String> {
        for _ in 0..self.size {
            self.cursor = (self.cursor + 1) % self.size;
            if self.cursor == 0 || self.cursor == self.size - 1 {
                continue;
            }
            let a = Ipv4Addr::from(self.base + self.cursor).to_string();
            if !used.contains(&a) {
                return Some(a);
            }
        }
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ServerState {
    #[serde(rename = "stopped")]
    Stopped,
    #[serde(rename = "stopped in place")]
    StoppedInPlace,
    #[serde(rename = "starting")]
    Starting,
    #[serde(rename = "running")]
    Running,
    #[serde(rename = "stopping")]
    Stopping,
    #[serde(rename = "locked")]
    Locked,
}

impl ServerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Stopped => "stopped",
            ServerState::StoppedInPlace => "stopped in place",
            ServerState::Starting => "starting",
            ServerState::Running => "running",
            ServerState::Stopping => "stopping",
            ServerState::Locked => "locked",
        }
    }

    /// As recorded: stopped → `poweron, backup`; starting/stopping →
    /// `stop_in_place, backup`; running → `poweroff, terminate, reboot, stop_in_place, backup`.
    pub fn allowed_actions(self) -> Vec<&'static str> {
        match self {
            ServerState::Stopped | ServerState::StoppedInPlace => vec!["poweron", "backup"],
            ServerState::Starting | ServerState::Stopping => vec!["stop_in_place", "backup"],
            ServerState::Running => {
                vec!["poweroff", "terminate", "reboot", "stop_in_place", "backup"]
            }
            ServerState::Locked => vec![],
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerVolume {
    pub id: String,
    /// `sbs_volume` (lives in the block API) or `l_ssd` (local, dies with the server).
    pub volume_type: String,
    pub size: u64,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub arch: String,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub id: String,
    pub zone: String,
    pub name: String,
    pub commercial_type: String,
    pub arch: String,
    pub project: String,
    pub image: Option<Image>,
    pub volumes: BTreeMap<String, ServerVolume>,
    pub tags: Vec<String>,
    pub state: ServerState,
    pub state_detail: String,
    pub mac_address: String,
    pub routed_ip_enabled: bool,
    pub dynamic_ip_required: bool,
    pub security_group: (String, String),
    pub created: DateTime<Utc>,
    pub modified: DateTime<Utc>,
    pub user_data: BTreeMap<String, Vec<u8>>,
    /// Bumped on every state change; a timer whose generation is stale does nothing.
    pub generation: u64,
    /// Set by an injected "stuck starting" fault: never leaves `starting`.
    pub stuck_starting: bool,
    pub locked: bool,
    /// `terminate` in progress: delete once stopped.
    pub terminating: bool,
}

#[derive(Debug, Clone)]
pub struct Ip {
    pub id: String,
    pub zone: String,
    pub address: String,
    pub project: String,
    pub ip_type: String,
    pub tags: Vec<String>,
    pub server: Option<String>,
    pub reverse: Option<String>,
    /// Made for `dynamic_ip_required`; released with its server.
    pub dynamic: bool,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub id: String,
    pub zone: String,
    pub name: String,
    pub project: String,
    pub size: u64,
    pub perf_iops: u64,
    pub tags: Vec<String>,
    pub status: String,
    pub server: Option<String>,
    pub reference_id: String,
    pub parent_snapshot_id: Option<String>,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub attached_at: Option<DateTime<Utc>>,
    pub last_detached_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct SecurityGroup {
    pub id: String,
    pub zone: String,
    pub name: String,
    pub description: Option<String>,
    pub project: String,
    pub project_default: bool,
    pub stateful: bool,
    pub inbound_default_policy: String,
    pub outbound_default_policy: String,
    pub enable_default_security: bool,
    pub tags: Vec<String>,
    pub rules: Vec<Value>,
    pub created: DateTime<Utc>,
    pub modified: DateTime<Utc>,
}

pub struct State {
    pub pool: IpPool,
    pub servers: BTreeMap<String, Server>,
    pub server_order: Vec<String>,
    pub ips: BTreeMap<String, Ip>,
    pub ip_order: Vec<String>,
    pub volumes: BTreeMap<String, Volume>,
    pub volume_order: Vec<String>,
    pub security_groups: BTreeMap<String, SecurityGroup>,
    pub sg_order: Vec<String>,
}

/// A server as the Rust API and the admin API show it.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    pub id: String,
    pub zone: String,
    pub name: String,
    pub commercial_type: String,
    pub state: String,
    pub tags: Vec<String>,
    pub public_ips: Vec<String>,
    pub volumes: Vec<String>,
    pub user_data_keys: Vec<String>,
    /// The process group of its VM, while one runs.
    pub vm_pgid: Option<i32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IpInfo {
    pub id: String,
    pub zone: String,
    pub address: String,
    pub server: Option<String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub id: String,
    pub zone: String,
    pub name: String,
    pub size: u64,
    pub status: String,
    pub server: Option<String>,
    pub tags: Vec<String>,
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl State {
    pub fn new(pool: IpPool) -> State {
        State {
            pool,
            servers: BTreeMap::new(),
            server_order: Vec::new(),
            ips: BTreeMap::new(),
            ip_order: Vec::new(),
            volumes: BTreeMap::new(),
            volume_order: Vec::new(),
            security_groups: BTreeMap::new(),
            sg_order: Vec::new(),
        }
    }

    pub fn take_address(&mut self) -> Option<String> {
        let used: BTreeSet<String> = self.ips.values().map(|i| i.address.clone()).collect();
        self.pool.take(&used)
    }

    pub fn new_ip(
        &mut self,
        zone: &str,
        project: &str,
        ip_type: &str,
        tags: Vec<String>,
    ) -> Option<String> {
        let address = self.take_address()?;
        let id = new_id();
        self.ips.insert(
            id.clone(),
            Ip {
                id: id.clone(),
                zone: zone.into(),
                address,
                project: project.into(),
                ip_type: ip_type.into(),
                tags,
                server: None,
                reverse: None,
                dynamic: false,
            },
        );
        self.ip_order.push(id.clone());
        Some(id)
    }

    /// The project's default security group in a zone, made on first use.
    pub fn default_security_group(&mut self, zone: &str, project: &str) -> (String, String) {
        if let Some(sg) = self
            .security_groups
            .values()
            .find(|sg| sg.zone == zone && sg.project == project && sg.project_default)
        {
            return (sg.id.clone(), sg.name.clone());
        }
        let now = Utc::now();
        let sg = SecurityGroup {
            id: new_id(),
            zone: zone.into(),
            name: "Default security group".into(),
            description: Some("Auto generated security group.".into()),
            project: project.into(),
            project_default: true,
            stateful: true,
            inbound_default_policy: "accept".into(),
            outbound_default_policy: "accept".into(),
            enable_default_security: true,
            tags: vec![],
            rules: vec![],
            created: now,
            modified: now,
        };
        let out = (sg.id.clone(), sg.name.clone());
        self.sg_order.push(sg.id.clone());
        self.security_groups.insert(sg.id.clone(), sg);
        out
    }

    pub fn server_ips(&self, server_id: &str) -> Vec<&Ip> {
        self.ip_order
            .iter()
            .filter_map(|id| self.ips.get(id))
            .filter(|ip| ip.server.as_deref() == Some(server_id))
            .collect()
    }

    /// The address a server's VM binds: its first attached IP.
    pub fn server_address(&self, server_id: &str) -> Option<String> {
        self.server_ips(server_id)
            .first()
            .map(|ip| ip.address.clone())
    }

    pub fn attach_volume(&mut self, volume_id: &str, server_id: &str) {
        if let Some(v) = self.volumes.get_mut(volume_id) {
            let now = Utc::now();
            v.server = Some(server_id.into());
            v.status = "in_use".into();
            v.reference_id = new_id();
            v.attached_at = Some(now);
            v.updated = now;
        }
    }

    pub fn detach_volume(&mut self, volume_id: &str) {
        if let Some(v) = self.volumes.get_mut(volume_id) {
            let now = Utc::now();
            v.server = None;
            v.status = "available".into();
            v.last_detached_at = Some(now);
            v.updated = now;
        }
    }

    /// Removes a server: SBS volumes are detached (they survive, as recorded
    /// after `terminate`), local volumes go with it, attached IPs are detached
    /// (dynamic ones released).
    pub fn remove_server(&mut self, id: &str) -> Option<Server> {
        let server = self.servers.remove(id)?;
        self.server_order.retain(|s| s != id);
        for v in server.volumes.values() {
            if v.volume_type == "sbs_volume" {
                self.detach_volume(&v.id);
            }
        }
        let dynamic: Vec<String> = self
            .ips
            .values()
            .filter(|ip| ip.server.as_deref() == Some(id) && ip.dynamic)
            .map(|ip| ip.id.clone())
            .collect();
        for ip_id in dynamic {
            self.ips.remove(&ip_id);
            self.ip_order.retain(|i| i != &ip_id);
        }
        for ip in self.ips.values_mut() {
            if ip.server.as_deref() == Some(id) {
                ip.server = None;
            }
        }
        Some(server)
    }

    pub fn ip_public_json(ip: &Ip) -> Value {
        json!({
            "id": ip.id, "address": ip.address, "dynamic": ip.dynamic, "gateway": "62.210.0.1",
            "netmask": "32", "family": "inet", "provisioning_mode": "dhcp", "tags": ip.tags,
            "state": "attached", "ipam_id": ip.id,
        })
    }

    pub fn server_json(&self, s: &Server) -> Value {
        let public_ips: Vec<Value> = self
            .server_ips(&s.id)
            .into_iter()
            .map(Self::ip_public_json)
            .collect();
        let public_ip = public_ips.first().cloned().unwrap_or(Value::Null);
        let volumes: serde_json::Map<String, Value> = s
            .volumes
            .iter()
            .map(|(k, v)| {
                let body = if v.volume_type == "sbs_volume" {
                    json!({"boot": false, "volume_type": "sbs_volume", "id": v.id, "state": "available", "zone": s.zone})
                } else {
                    json!({"boot": false, "volume_type": v.volume_type, "id": v.id, "name": v.name,
                           "export_uri": null, "organization": s.project, "project": s.project,
                           "server": {"id": s.id, "name": s.name}, "size": v.size, "state": "available",
                           "creation_date": instance_date(s.created), "modification_date": instance_date(s.created),
                           "tags": [], "zone": s.zone})
                };
                (k.clone(), body)
            })
            .collect();
        let image = match &s.image {
            Some(img) => json!({
                "id": img.id, "name": img.name, "organization": "51b656e3-4865-41e8-adbc-0c45bdd780db",
                "project": "51b656e3-4865-41e8-adbc-0c45bdd780db",
                "root_volume": {"volume_type": "sbs_snapshot", "id": img.id, "size": 0, "name": ""},
                "extra_volumes": {}, "public": true, "arch": img.arch,
                "creation_date": "2025-09-12T09:19:32.472362+00:00", "modification_date": "2025-09-12T09:19:32.472362+00:00",
                "default_bootscript": null, "from_server": "", "state": "available", "tags": [], "zone": s.zone,
            }),
            None => Value::Null,
        };
        let location = match s.state {
            ServerState::Running | ServerState::Stopping => json!({
                "zone_id": s.zone, "platform_id": "14", "cluster_id": "42", "hypervisor_id": "404", "node_id": "57"
            }),
            _ => Value::Null,
        };
        let state = if s.locked {
            ServerState::Locked
        } else {
            s.state
        };
        json!({
            "id": s.id, "name": s.name, "arch": s.arch, "commercial_type": s.commercial_type,
            "boot_type": "local", "organization": s.project, "project": s.project, "hostname": s.name,
            "image": image, "volumes": volumes, "tags": s.tags, "state": state.as_str(),
            "protected": false, "state_detail": s.state_detail, "public_ip": public_ip, "public_ips": public_ips,
            "mac_address": s.mac_address, "routed_ip_enabled": s.routed_ip_enabled, "ipv6": null,
            "extra_networks": [], "dynamic_ip_required": s.dynamic_ip_required, "enable_ipv6": false,
            "private_ip": null, "creation_date": instance_date(s.created),
            "modification_date": instance_date(s.modified), "bootscript": null,
            "security_group": {"id": s.security_group.0, "name": s.security_group.1},
            "location": location, "maintenances": [], "allowed_actions": state.allowed_actions(),
            "placement_group": null, "private_nics": [], "zone": s.zone, "filesystems": [],
            "end_of_service": false, "dns": format!("{}.pub.instances.scw.cloud", s.id),
        })
    }

    pub fn ip_json(&self, ip: &Ip) -> Value {
        let server = ip
            .server
            .as_ref()
            .and_then(|id| self.servers.get(id))
            .map(|s| json!({"id": s.id, "name": s.name}))
            .unwrap_or(Value::Null);
        json!({
            "id": ip.id, "address": ip.address, "prefix": null, "reverse": ip.reverse, "server": server,
            "organization": ip.project, "project": ip.project, "zone": ip.zone, "type": ip.ip_type,
            "state": if ip.server.is_some() { "attached" } else { "detached" }, "tags": ip.tags,
            "ipam_id": ip.id,
        })
    }

    pub fn volume_json(&self, v: &Volume) -> Value {
        let references: Vec<Value> = match (&v.server, v.attached_at) {
            (Some(server), Some(at)) => vec![json!({
                "id": v.reference_id, "product_resource_type": "instance_server", "product_resource_id": server,
                "created_at": block_date(at), "type": "exclusive", "status": "attached"
            })],
            _ => vec![],
        };
        json!({
            "id": v.id, "name": v.name, "type": format!("sbs_{}k", v.perf_iops / 1000), "size": v.size,
            "project_id": v.project, "created_at": block_date(v.created), "updated_at": block_date(v.updated),
            "references": references, "parent_snapshot_id": v.parent_snapshot_id, "status": v.status,
            "tags": v.tags, "specs": {"perf_iops": v.perf_iops, "class": "sbs"},
            "last_detached_at": v.last_detached_at.map(block_date), "kms_key_id": null, "zone": v.zone,
        })
    }

    pub fn sg_json(&self, sg: &SecurityGroup) -> Value {
        let servers: Vec<Value> = self
            .server_order
            .iter()
            .filter_map(|id| self.servers.get(id))
            .filter(|s| s.security_group.0 == sg.id)
            .map(|s| json!({"id": s.id, "name": s.name}))
            .collect();
        json!({
            "id": sg.id, "creation_date": instance_date(sg.created), "modification_date": instance_date(sg.modified),
            "name": sg.name, "description": sg.description, "organization": sg.project, "project": sg.project,
            "servers": servers, "stateful": sg.stateful, "inbound_default_policy": sg.inbound_default_policy,
            "outbound_default_policy": sg.outbound_default_policy, "organization_default": false,
            "project_default": sg.project_default, "enable_default_security": sg.enable_default_security,
            "state": "available", "tags": sg.tags, "zone": sg.zone,
        })
    }

    pub fn server_infos(&self, vms: &Vms) -> Vec<ServerInfo> {
        self.server_order
            .iter()
            .filter_map(|id| self.servers.get(id))
            .map(|s| ServerInfo {
                id: s.id.clone(),
                zone: s.zone.clone(),
                name: s.name.clone(),
                commercial_type: s.commercial_type.clone(),
                state: if s.locked {
                    "locked".into()
                } else {
                    s.state.as_str().into()
                },
                tags: s.tags.clone(),
                public_ips: self
                    .server_ips(&s.id)
                    .iter()
                    .map(|ip| ip.address.clone())
                    .collect(),
                volumes: s.volumes.values().map(|v| v.id.clone()).collect(),
                user_data_keys: s.user_data.keys().cloned().collect(),
                vm_pgid: vms.pgid(&s.id),
            })
            .collect()
    }

    pub fn ip_infos(&self) -> Vec<IpInfo> {
        self.ip_order
            .iter()
            .filter_map(|id| self.ips.get(id))
            .map(|ip| IpInfo {
                id: ip.id.clone(),
                zone: ip.zone.clone(),
                address: ip.address.clone(),
                server: ip.server.clone(),
                tags: ip.tags.clone(),
            })
            .collect()
    }

    pub fn volume_infos(&self) -> Vec<VolumeInfo> {
        self.volume_order
            .iter()
            .filter_map(|id| self.volumes.get(id))
            .map(|v| VolumeInfo {
                id: v.id.clone(),
                zone: v.zone.clone(),
                name: v.name.clone(),
                size: v.size,
                status: v.status.clone(),
                server: v.server.clone(),
                tags: v.tags.clone(),
            })
            .collect()
    }
}
