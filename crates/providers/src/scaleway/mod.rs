//! Scaleway: GPU Instances through the Instance API v1, model-cache volumes
//! through the Block Storage API (SBS), OS images through the Marketplace API.
//!
//! **Ids.** A machine's [`ProviderInstanceId`] is `<zone>/<server uuid>`
//! (the Instance API is zonal).
//!
//! **Tags.** Scaleway tags are plain strings: every resource gpufleet makes
//! carries `gpufleet`, one `key=value` per request tag (at least
//! `gpufleet-cluster=<id>` and `gpufleet-instance=<id>`) and the settings'
//! extra tags; volumes also carry `gpufleet-volume=root|models`. A machine's
//! tags decode the `key=value` strings (extra tags excepted), so they give
//! back the map the caller passed. Lookups filter by tag on the server side
//! (`tags=`) and check again on this side.
//!
//! **Create** is idempotent and crash-safe: the server is first looked up by
//! its instance tag and, if found, taken on from where it is; otherwise each
//! piece (image, security group, model volume, routed IPv4, server) is looked
//! up by name or tag before it is made, then the cloud-init user data is set
//! (`PATCH .../user_data/cloud-init`, `text/plain`) and the server powered on.
//!
//! **Stock.** The catalog keeps every type listed; a type whose availability
//! is `shortage` in the zone makes `create` fail with `OutOfCapacity` before
//! any resource is made (the create call itself would also answer `out_of_stock`).
//!
//! **States** (`server.state` → [`MachineState`]): `starting` → `Pending`,
//! `running` → `Running`, `stopping` → `Stopping`, `stopped` and
//! `stopped in place` → `Stopped` (a server made but not powered on yet is
//! `stopped`: it exists, it is not gone), `locked` (Scaleway holds it, e.g. an
//! abuse or billing lock) → `Pending`, logged. The IP is reported only while
//! the server is `running` (the routed IP is attached from creation on, but
//! nothing answers there before).
//!
//! **Terminate** leaves nothing billable: `terminate` (running) or `DELETE`
//! (stopped) removes the server but not its SBS volumes nor its flexible IP,
//! which are deleted once the server is gone (found by instance tag and by the
//! ids the server listed). Until they are, `get` answers `Stopping`, so the
//! terminator calls `terminate` again; then `NotFound`. After a control-plane
//! restart mid-way, the orphan reaper finds the leftovers by cluster tag.

mod api;
mod catalog;
mod config;

pub use api::{map_error, ApiCalls};
pub use catalog::{nvml_gpu_name, power_limit_w};
pub use config::{
    is_zone, region_of, ConfigError, ScalewayConfig, ScalewaySettings, SecretKey, DEFAULT_API_URL,
    DEFAULT_ZONE,
};

use crate::cloudinit::{self, AgentInstall};
use crate::{
    tags, Catalog, CreateRequest, Machine, MachineState, Provider, ProviderError, Resource,
    ResourceKind,
};
use api::{Answer, Api, Body, Server, ServerEnvelope};
use async_trait::async_trait;
use chrono::Utc;
use gpufleet_domain::{InstanceType, ProviderInstanceId, ProviderName};
use gpufleet_proto::EngineSpec;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The provider's name.
pub const PROVIDER_NAME: &str = "scaleway";
/// The tag every gpufleet resource carries.
pub const TAG: &str = "gpufleet";
/// The tag key telling a volume's role (`root` or `models`).
pub const VOLUME_ROLE_TAG: &str = "gpufleet-volume";
/// Where the machine mounts the model-cache volume; the engine's cache dir.
/// (Until the user data mounts it, it is a directory of the root volume.)
pub const MODEL_CACHE_DIR: &str = "/var/lib/gpufleet/models";

const PER_PAGE: u32 = 50;
const MAX_PAGES: u32 = 200;

/// Why the provider cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ScalewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot build the Scaleway HTTP client: {0}")]
    Http(String),
}

#[derive(Clone)]
struct ZoneCatalog {
    fetched: Instant,
    types: Vec<InstanceType>,
    shortage: BTreeSet<String>,
}

/// What is left to delete once a terminated server is gone.
#[derive(Debug, Clone)]
struct Cleanup {
    zone: String,
    instance_tag: Option<String>,
    volume_ids: BTreeSet<String>,
    ip_ids: BTreeSet<String>,
    instance_type: String,
    tags: BTreeMap<String, String>,
    created_at: chrono::DateTime<Utc>,
}

/// The Scaleway provider.
pub struct ScalewayProvider {
    name: ProviderName,
    config: ScalewayConfig,
    settings: ScalewaySettings,
    zones: Vec<String>,
    install: AgentInstall,
    api: Arc<Api>,
    catalogs: Mutex<HashMap<String, ZoneCatalog>>,
    catalog_refresh: tokio::sync::Mutex<()>,
    images: Mutex<HashMap<(String, String), String>>,
    security_groups: tokio::sync::Mutex<HashMap<String, String>>,
    cleanups: Mutex<HashMap<String, Cleanup>>,
    /// Recent listings of gpufleet's servers per zone, so that `get` of many
    /// machines (the boot watcher polls every booting one) costs one paged
    /// list, not one call each: the API is rate-limited.
    snapshots: tokio::sync::Mutex<HashMap<String, Snapshot>>,
}

impl std::fmt::Debug for ScalewayProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScalewayProvider")
            .field("config", &self.config)
            .field("zones", &self.zones)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `key=value` strings for a tag map, after [`TAG`].
pub fn encode_tags(tags: &BTreeMap<String, String>) -> Vec<String> {
    std::iter::once(TAG.to_string())
        .chain(tags.iter().map(|(k, v)| format!("{k}={v}")))
        .collect()
}

/// The tag map back from Scaleway's strings: every `key=value` except the
/// `extra` plain tags of the settings.
pub fn decode_tags(tags: &[String], extra: &[String]) -> BTreeMap<String, String> {
    tags.iter()
        .filter(|t| !extra.contains(t))
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Scaleway's `server.state` → [`MachineState`] (see the module docs).
pub fn map_state(state: &str) -> MachineState {
    match state {
        "running" => MachineState::Running,
        "starting" => MachineState::Pending,
        "stopping" => MachineState::Stopping,
        "stopped" | "stopped in place" => MachineState::Stopped,
        "locked" => {
            warn!(provider = PROVIDER_NAME, "a server is locked by Scaleway");
            MachineState::Pending
        }
        other => {
            warn!(
                provider = PROVIDER_NAME,
                state = other,
                "unknown server state"
            );
            MachineState::Pending
        }
    }
}

/// Size of the model-cache volume, GiB: max(minimum, weights × 2.5 + 10 GiB).
pub fn model_volume_gib(min_gib: u64, model_size_mib: u64) -> u64 {
    let needed = (model_size_mib.saturating_mul(5)).div_ceil(2 * 1024) + 10;
    if model_size_mib == 0 {
        min_gib
    } else {
        min_gib.max(needed)
    }
}

/// GiB → bytes, rounded up to whole GB (10^9 bytes, the API's unit).
pub fn gib_to_api_bytes(gib: u64) -> u64 {
    const GB: u64 = 1_000_000_000;
    (gib << 30).div_ceil(GB) * GB
}

fn not_found_is_retryable(e: ProviderError, what: &str) -> ProviderError {
    match e {
        ProviderError::NotFound { .. } => ProviderError::retryable(format!(
            "{what} vanished while gpufleet used it; the next try looks again"
        )),
        e => e,
    }
}

/// How long a listing of a zone's servers answers `get`.
const SNAPSHOT_TTL: Duration = Duration::from_millis(500);

/// A listing of a zone's gpufleet servers.
struct Snapshot {
    taken: Instant,
    servers: HashMap<String, Server>,
}

impl ScalewayProvider {
    /// Builds the provider (no call is made).
    pub fn new(
        config: ScalewayConfig,
        settings: ScalewaySettings,
        install: AgentInstall,
    ) -> Result<Arc<Self>, ScalewayError> {
        let zones = settings.validate(&config)?;
        let api = Api::new(
            &config.api_url,
            config.secret_key.clone(),
            Duration::from_millis(settings.request_timeout_ms),
            settings.max_concurrent_requests,
        )
        .map_err(|e| ScalewayError::Http(e.to_string()))?;
        Ok(Arc::new(Self {
            name: ProviderName::try_from(PROVIDER_NAME.to_string())
                .expect("`scaleway` is a valid provider name"),
            config,
            settings,
            zones,
            install,
            api,
            catalogs: Mutex::new(HashMap::new()),
            catalog_refresh: tokio::sync::Mutex::new(()),
            images: Mutex::new(HashMap::new()),
            security_groups: tokio::sync::Mutex::new(HashMap::new()),
            cleanups: Mutex::new(HashMap::new()),
            snapshots: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// API calls made so far (for "API calls per instance").
    pub fn api_calls(&self) -> ApiCalls {
        self.api.calls.snapshot()
    }

    /// The zones machines may be made in.
    pub fn zones(&self) -> &[String] {
        &self.zones
    }

    fn machine_id(zone: &str, server_id: &str) -> ProviderInstanceId {
        ProviderInstanceId::new(format!("{zone}/{server_id}"))
    }

    fn parse_id<'a>(
        &self,
        id: &'a ProviderInstanceId,
    ) -> Result<(&'a str, &'a str), ProviderError> {
        match id.as_str().split_once('/') {
            Some((zone, sid)) if is_zone(zone) && !sid.is_empty() && !sid.contains('/') => {
                Ok((zone, sid))
            }
            _ => Err(ProviderError::InvalidRequest {
                field: "id",
                message: format!("{id} is not a Scaleway machine id (<zone>/<server id>)"),
            }),
        }
    }

    fn all_tags(&self, tags: &BTreeMap<String, String>, role: Option<&str>) -> Vec<String> {
        let mut out = encode_tags(tags);
        if let Some(r) = role {
            out.push(format!("{VOLUME_ROLE_TAG}={r}"));
        }
        out.extend(self.settings.tags.iter().cloned());
        out
    }

    fn machine(&self, zone: &str, s: &Server) -> Machine {
        let state = map_state(&s.state);
        let ip = if state == MachineState::Running {
            s.public_ips
                .iter()
                .chain(s.public_ip.iter())
                .filter_map(|i| i.address.as_deref())
                .find_map(|a| a.parse::<IpAddr>().ok())
        } else {
            None
        };
        Machine {
            id: Self::machine_id(zone, &s.id),
            state,
            ip,
            zone: zone.to_string(),
            instance_type: s.commercial_type.clone(),
            tags: decode_tags(&s.tags, &self.settings.tags),
            created_at: s.creation_date.unwrap_or_else(Utc::now),
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Body,
        what: &str,
    ) -> Result<T, ProviderError> {
        self.api
            .call(op, method, path, query, body)
            .await?
            .json(what)
    }

    /// Every page of a listing. `count` says how many items a page held.
    async fn pages<T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        query: &[(&str, String)],
        page_size_param: &str,
        count: impl Fn(&T) -> usize,
    ) -> Result<Vec<T>, ProviderError> {
        let mut out = Vec::new();
        let mut page = 1u32;
        let mut seen = 0u64;
        for _ in 0..MAX_PAGES {
            let mut q = query.to_vec();
            q.push(("page", page.to_string()));
            q.push((page_size_param, PER_PAGE.to_string()));
            let answer: Answer = self.api.call(op, Method::GET, path, &q, Body::None).await?;
            let t: T = answer.json(path)?;
            let n = count(&t);
            seen += n as u64;
            out.push(t);
            let total = answer.total_count();
            let next = match (answer.next_page(), total) {
                _ if n == 0 => None,
                (Some(p), _) if p > page => Some(p),
                (Some(_), _) => None,
                (None, Some(total)) if seen < total => Some(page + 1),
                (None, Some(_)) => None,
                (None, None) if n as u32 >= PER_PAGE => Some(page + 1),
                (None, None) => None,
            };
            match next {
                Some(p) => page = p,
                None => break,
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------- catalog

    async fn zone_catalog(
        &self,
        op: &'static str,
        zone: &str,
    ) -> Result<ZoneCatalog, ProviderError> {
        let ttl = Duration::from_secs(self.settings.catalog_ttl_secs);
        let cached = lock(&self.catalogs).get(zone).cloned();
        if let Some(c) = &cached {
            if c.fetched.elapsed() < ttl {
                return Ok(c.clone());
            }
        }
        let _one = self.catalog_refresh.lock().await;
        if let Some(c) = lock(&self.catalogs).get(zone) {
            if c.fetched.elapsed() < ttl {
                return Ok(c.clone());
            }
        }
        match self.fetch_catalog(op, zone).await {
            Ok(c) => {
                lock(&self.catalogs).insert(zone.to_string(), c.clone());
                Ok(c)
            }
            Err(e) => match cached {
                Some(stale) => {
                    warn!(provider = PROVIDER_NAME, zone, error = %e, "catalog refresh failed; serving the cached one");
                    Ok(stale)
                }
                None => Err(e),
            },
        }
    }

    async fn fetch_catalog(
        &self,
        op: &'static str,
        zone: &str,
    ) -> Result<ZoneCatalog, ProviderError> {
        let base = format!("/instance/v1/zones/{zone}/products/servers");
        let products: Vec<api::ProductsPage> = self
            .pages(op, &base, &[], "per_page", |p: &api::ProductsPage| {
                p.servers.len()
            })
            .await?;
        let stock: Vec<api::AvailabilityPage> = self
            .pages(
                op,
                &format!("{base}/availability"),
                &[],
                "per_page",
                |p: &api::AvailabilityPage| p.servers.len(),
            )
            .await?;
        let shortage = stock
            .iter()
            .flat_map(|p| p.servers.iter())
            .filter(|(_, a)| a.availability == "shortage")
            .map(|(n, _)| n.clone())
            .collect();
        let types = products
            .iter()
            .flat_map(|p| p.servers.iter())
            .filter(|(_, p)| !p.end_of_service)
            .filter(|(_, p)| !self.settings.gpu_only || p.gpu > 0)
            .map(|(name, p)| catalog::instance_type(name, p, zone))
            .collect();
        Ok(ZoneCatalog {
            fetched: Instant::now(),
            types,
            shortage,
        })
    }

    /// `OutOfCapacity` when the zone's stock says `shortage` for the type.
    async fn check_stock(&self, zone: &str, instance_type: &str) -> Result<(), ProviderError> {
        match self.zone_catalog("create", zone).await {
            Ok(c) if c.shortage.contains(instance_type) => Err(ProviderError::OutOfCapacity {
                message: format!("Scaleway reports a shortage of {instance_type} in {zone}"),
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                debug!(provider = PROVIDER_NAME, zone, error = %e, "stock unknown; trying anyway");
                Ok(())
            }
        }
    }

    // -------------------------------------------------------------- lookups

    /// `sid` as a listing of the zone's gpufleet servers at most
    /// [`SNAPSHOT_TTL`] old shows it (listing again when older). `None`:
    /// not in it (just made, or gone): ask for the server itself.
    async fn snapshot_server(&self, zone: &str, sid: &str) -> Option<Server> {
        let mut snapshots = self.snapshots.lock().await;
        let fresh = snapshots
            .get(zone)
            .is_some_and(|s| s.taken.elapsed() < SNAPSHOT_TTL);
        if !fresh {
            match self.list_servers("get", zone, &[TAG.to_string()]).await {
                Ok(servers) => {
                    snapshots.insert(
                        zone.to_string(),
                        Snapshot {
                            taken: Instant::now(),
                            servers: servers.into_iter().map(|s| (s.id.clone(), s)).collect(),
                        },
                    );
                }
                Err(e) => {
                    debug!(zone, error = %e, "cannot list servers; asking for the one");
                    return None;
                }
            }
        }
        snapshots.get(zone)?.servers.get(sid).cloned()
    }

    /// Every item of a tag-filtered listing (all pages), keeping only those
    /// that carry every one of `tags` (the API's filter is not trusted).
    async fn list_tagged<P: api::TaggedPage>(
        &self,
        op: &'static str,
        path: &str,
        query: &[(&str, String)],
        page_size_param: &str,
        tags: &[String],
    ) -> Result<Vec<P::Item>, ProviderError> {
        let pages: Vec<P> = self.pages(op, path, query, page_size_param, P::len).await?;
        Ok(pages
            .into_iter()
            .flat_map(P::items)
            .filter(|item| tags.iter().all(|t| P::tags(item).contains(t)))
            .collect())
    }

    async fn list_servers(
        &self,
        op: &'static str,
        zone: &str,
        tags: &[String],
    ) -> Result<Vec<Server>, ProviderError> {
        let q = [
            ("tags", tags.join(",")),
            ("project", self.config.project_id.clone()),
        ];
        let path = format!("/instance/v1/zones/{zone}/servers");
        self.list_tagged::<api::ServersPage>(op, &path, &q, "per_page", tags)
            .await
    }

    async fn list_ips(
        &self,
        op: &'static str,
        zone: &str,
        tags: &[String],
    ) -> Result<Vec<api::Ip>, ProviderError> {
        let q = [
            ("tags", tags.join(",")),
            ("project", self.config.project_id.clone()),
        ];
        let path = format!("/instance/v1/zones/{zone}/ips");
        self.list_tagged::<api::IpsPage>(op, &path, &q, "per_page", tags)
            .await
    }

    async fn list_volumes(
        &self,
        op: &'static str,
        zone: &str,
        tags: &[String],
    ) -> Result<Vec<api::Volume>, ProviderError> {
        // The Block API repeats `tags` (any of them matches).
        let mut q: Vec<(&str, String)> = tags.iter().map(|t| ("tags", t.clone())).collect();
        q.push(("project_id", self.config.project_id.clone()));
        let path = format!("/block/v1/zones/{zone}/volumes");
        self.list_tagged::<api::VolumesPage>(op, &path, &q, "page_size", tags)
            .await
    }

    async fn image(&self, zone: &str, instance_type: &str) -> Result<String, ProviderError> {
        let key = (zone.to_string(), instance_type.to_string());
        if let Some(id) = lock(&self.images).get(&key) {
            return Ok(id.clone());
        }
        let label = &self.settings.image_label;
        let images: api::LocalImages = self
            .json(
                "create",
                Method::GET,
                "/marketplace/v2/local-images",
                &[
                    ("image_label", label.clone()),
                    ("zone", zone.to_string()),
                    ("type", "instance_sbs".to_string()),
                ],
                Body::None,
                "the image lookup",
            )
            .await?;
        if images.local_images.is_empty() {
            return Err(ProviderError::InvalidRequest {
                field: "image",
                message: format!(
                    "no image labelled {label} in {zone} (providers.scaleway.image_label)"
                ),
            });
        }
        let id = images
            .local_images
            .iter()
            .find(|i| {
                i.compatible_commercial_types
                    .iter()
                    .any(|t| t == instance_type)
            })
            .map(|i| i.id.clone())
            .ok_or_else(|| ProviderError::InvalidRequest {
                field: "instance_type",
                message: format!("image {label} in {zone} does not run on {instance_type}"),
            })?;
        lock(&self.images).insert(key, id.clone());
        Ok(id)
    }

    async fn security_group(&self, zone: &str) -> Result<String, ProviderError> {
        let mut groups = self.security_groups.lock().await;
        if let Some(id) = groups.get(zone) {
            return Ok(id.clone());
        }
        let op = "create";
        let name = &self.settings.security_group_name;
        let path = format!("/instance/v1/zones/{zone}/security_groups");
        let found: api::SecurityGroupsPage = self
            .json(
                op,
                Method::GET,
                &path,
                &[
                    ("name", name.clone()),
                    ("project", self.config.project_id.clone()),
                ],
                Body::None,
                "the security group lookup",
            )
            .await?;
        let (id, existing) = match found.security_groups.into_iter().find(|g| &g.name == name) {
            Some(g) => (g.id, true),
            None => {
                let made: api::SecurityGroupEnvelope = self
                    .json(
                        op,
                        Method::POST,
                        &path,
                        &[],
                        Body::Json(json!({
                            "name": name,
                            "project": self.config.project_id,
                            "description": "gpufleet machines: agent and engine ports only",
                            "stateful": true,
                            "inbound_default_policy": "drop",
                            "outbound_default_policy": "accept",
                            "enable_default_security": true,
                            "tags": [TAG],
                        })),
                        "the security group creation",
                    )
                    .await?;
                info!(provider = PROVIDER_NAME, zone, id = %made.security_group.id, "security group created");
                (made.security_group.id, false)
            }
        };
        let rules_path = format!("{path}/{id}/rules");
        let mut missing = vec![self.settings.agent_port, self.settings.engine_port];
        if existing {
            let rules: api::RulesPage = self
                .json(
                    op,
                    Method::GET,
                    &rules_path,
                    &[("per_page", "100".into())],
                    Body::None,
                    "the rules",
                )
                .await?;
            missing.retain(|port| {
                !rules.rules.iter().any(|r| {
                    r.direction == "inbound"
                        && r.action == "accept"
                        && r.protocol == "TCP"
                        && r.dest_port_from == Some(u32::from(*port))
                })
            });
        }
        for port in missing {
            self.api
                .call(
                    op,
                    Method::POST,
                    &rules_path,
                    &[],
                    Body::Json(json!({
                        "action": "accept",
                        "protocol": "TCP",
                        "direction": "inbound",
                        "ip_range": "0.0.0.0/0",
                        "dest_port_from": port,
                    })),
                )
                .await?;
        }
        groups.insert(zone.to_string(), id.clone());
        Ok(id)
    }

    async fn resume(
        &self,
        req: &CreateRequest,
        zone: &str,
        server: Server,
    ) -> Result<Machine, ProviderError> {
        let op = "create";
        if !matches!(server.state.as_str(), "stopped" | "stopped in place") {
            return Ok(self.machine(zone, &server));
        }
        let base = format!("/instance/v1/zones/{zone}/servers/{}", server.id);
        // The volumes are made by the server: tag them so that they are
        // found (and deleted) like the rest; the model volume gets its IOPS.
        for (index, role) in [("0", "root"), ("1", "models")] {
            let Some(volume) = server
                .volumes
                .get(index)
                .filter(|v| v.volume_type == "sbs_volume")
            else {
                continue;
            };
            let mut patch = json!({"tags": self.all_tags(&req.tags, Some(role))});
            if role == "models" {
                patch["perf_iops"] = json!(self.settings.model_volume_iops);
            }
            self.api
                .call(
                    op,
                    Method::PATCH,
                    &format!("/block/v1/zones/{zone}/volumes/{}", volume.id),
                    &[],
                    Body::Json(patch),
                )
                .await
                .map_err(|e| not_found_is_retryable(e, "a volume of the server"))?;
        }
        // A server this attempt made has no user data yet.
        let has_user_data = !req.first_attempt && {
            let keys: api::UserDataKeys = self
                .json(
                    op,
                    Method::GET,
                    &format!("{base}/user_data"),
                    &[],
                    Body::None,
                    "the user data keys",
                )
                .await
                .map_err(|e| not_found_is_retryable(e, "the server"))?;
            keys.user_data.iter().any(|k| k == "cloud-init")
        };
        if !has_user_data {
            // The model volume (attached as volume 1) holds the model cache.
            let disk = server.volumes.get("1").map(|v| cloudinit::CacheDisk {
                device: format!("/dev/disk/by-id/scsi-0SCW_sbs_volume-{}", v.id),
                mount_point: MODEL_CACHE_DIR.to_string(),
            });
            let ud = cloudinit::user_data(&req.bootstrap, &self.install, disk.as_ref());
            self.api
                .call(
                    op,
                    Method::PATCH,
                    &format!("{base}/user_data/cloud-init"),
                    &[],
                    Body::Text(ud),
                )
                .await
                .map_err(|e| not_found_is_retryable(e, "the server"))?;
        }
        self.api
            .call(
                op,
                Method::POST,
                &format!("{base}/action"),
                &[],
                Body::Json(json!({"action": "poweron"})),
            )
            .await
            .map_err(|e| not_found_is_retryable(e, "the server"))?;
        let mut m = self.machine(zone, &server);
        m.state = MachineState::Pending;
        m.ip = None;
        Ok(m)
    }

    // -------------------------------------------------------------- cleanup

    fn remember_cleanup(&self, zone: &str, s: &Server) {
        let entry = Cleanup {
            zone: zone.to_string(),
            instance_tag: s
                .tags
                .iter()
                .find(|t| t.starts_with(&format!("{}=", tags::INSTANCE)))
                .cloned(),
            volume_ids: s
                .volumes
                .values()
                .filter(|v| v.volume_type == "sbs_volume")
                .map(|v| v.id.clone())
                .collect(),
            ip_ids: s
                .public_ips
                .iter()
                .map(|i| i.id.clone())
                .filter(|i| !i.is_empty())
                .collect(),
            instance_type: s.commercial_type.clone(),
            tags: decode_tags(&s.tags, &self.settings.tags),
            created_at: s.creation_date.unwrap_or_else(Utc::now),
        };
        let mut all = lock(&self.cleanups);
        match all.get_mut(&s.id) {
            Some(e) => {
                e.volume_ids.extend(entry.volume_ids);
                e.ip_ids.extend(entry.ip_ids);
            }
            None => {
                all.insert(s.id.clone(), entry);
            }
        }
    }

    /// Deletes what a gone server left. `Ok(true)`: nothing is left.
    async fn finish_cleanup(
        &self,
        op: &'static str,
        server_id: &str,
    ) -> Result<bool, ProviderError> {
        let Some(entry) = lock(&self.cleanups).get(server_id).cloned() else {
            return Ok(true);
        };
        let zone = &entry.zone;
        let mut volumes = entry.volume_ids.clone();
        let mut ips = entry.ip_ids.clone();
        if let Some(tag) = &entry.instance_tag {
            let t = vec![TAG.to_string(), tag.clone()];
            volumes.extend(
                self.list_volumes(op, zone, &t)
                    .await?
                    .into_iter()
                    .map(|v| v.id),
            );
            ips.extend(self.list_ips(op, zone, &t).await?.into_iter().map(|i| i.id));
        }
        let mut left = false;
        let paths = volumes
            .iter()
            .map(|v| format!("/block/v1/zones/{zone}/volumes/{v}"))
            .chain(
                ips.iter()
                    .map(|i| format!("/instance/v1/zones/{zone}/ips/{i}")),
            );
        for path in paths {
            match self
                .api
                .call(op, Method::DELETE, &path, &[], Body::None)
                .await
            {
                Ok(_) | Err(ProviderError::NotFound { .. }) => {}
                Err(e) if e.is_retryable() => {
                    debug!(provider = PROVIDER_NAME, path, error = %e, "not deletable yet");
                    left = true;
                }
                Err(e) => return Err(e),
            }
        }
        if !left {
            lock(&self.cleanups).remove(server_id);
        }
        Ok(!left)
    }
}

#[async_trait]
impl Provider for ScalewayProvider {
    fn name(&self) -> &ProviderName {
        &self.name
    }

    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        let zone = req.zone.as_str();
        if !self.zones.iter().any(|z| z == zone) {
            return Err(ProviderError::InvalidRequest {
                field: "zone",
                message: format!(
                    "{zone} is not one of providers.scaleway.zones ({})",
                    self.zones.join(", ")
                ),
            });
        }
        let Some(instance) = req.tags.get(tags::INSTANCE) else {
            return Err(ProviderError::InvalidRequest {
                field: "tags",
                message: format!("the {} tag is missing", tags::INSTANCE),
            });
        };
        let instance_tag = format!("{}={instance}", tags::INSTANCE);
        let lookup = vec![TAG.to_string(), instance_tag];
        // A first attempt cannot have made anything: no lookups.
        let mut found = if req.first_attempt {
            Vec::new()
        } else {
            self.list_servers("create", zone, &lookup).await?
        };
        found.sort_by_key(|s| s.creation_date);
        if let Some(server) = found.into_iter().next() {
            debug!(provider = PROVIDER_NAME, server = %server.id, state = %server.state, "create resumes a server");
            return self.resume(req, zone, server).await;
        }
        self.check_stock(zone, &req.instance_type).await?;
        let image = self.image(zone, &req.instance_type).await?;
        let security_group = self.security_group(zone).await?;
        // One call makes the server, its root and model-cache SBS volumes
        // and a dynamic routed IPv4 (released with the server): under the
        // API's rate limit, every call of a create counts. The volumes are
        // tagged (and the model volume's IOPS set) before poweron.
        let model_gib = model_volume_gib(self.settings.model_volume_min_gib, req.model_size_mib);
        let body = json!({
            "name": format!("gpufleet-{}", req.instance_id),
            "commercial_type": req.instance_type,
            "image": image,
            "project": self.config.project_id,
            "tags": self.all_tags(&req.tags, None),
            "boot_type": "local",
            "dynamic_ip_required": true,
            "routed_ip_enabled": true,
            "security_group": security_group,
            "volumes": {
                "0": {
                    "size": gib_to_api_bytes(self.settings.root_volume_gib),
                    "volume_type": "sbs_volume",
                },
                "1": {
                    "name": format!("gpufleet-{}-models", req.instance_id),
                    "size": gib_to_api_bytes(model_gib),
                    "volume_type": "sbs_volume",
                },
            },
        });
        let made: ServerEnvelope = self
            .json(
                "create",
                Method::POST,
                &format!("/instance/v1/zones/{zone}/servers"),
                &[],
                Body::Json(body),
                "the server creation",
            )
            .await
            .map_err(|e| not_found_is_retryable(e, "a resource of the server"))?;
        info!(provider = PROVIDER_NAME, instance = %req.instance_id, server = %made.server.id, zone, "server created");
        self.resume(req, zone, made.server).await
    }

    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        let (zone, sid) = self.parse_id(id)?;
        if let Some(server) = self.snapshot_server(zone, sid).await {
            return Ok(self.machine(zone, &server));
        }
        let answer = self
            .json::<ServerEnvelope>(
                "get",
                Method::GET,
                &format!("/instance/v1/zones/{zone}/servers/{sid}"),
                &[],
                Body::None,
                "the server",
            )
            .await;
        match answer {
            Ok(s) => Ok(self.machine(zone, &s.server)),
            Err(ProviderError::NotFound { .. }) => {
                let entry = lock(&self.cleanups).get(sid).cloned();
                match entry {
                    Some(e) if !self.finish_cleanup("get", sid).await? => Ok(Machine {
                        id: id.clone(),
                        state: MachineState::Stopping,
                        ip: None,
                        zone: e.zone,
                        instance_type: e.instance_type,
                        tags: e.tags,
                        created_at: e.created_at,
                    }),
                    _ => Err(ProviderError::NotFound { id: id.clone() }),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        let op = "terminate";
        let (zone, sid) = self.parse_id(id)?;
        let base = format!("/instance/v1/zones/{zone}/servers/{sid}");
        let server = match self
            .json::<ServerEnvelope>(op, Method::GET, &base, &[], Body::None, "the server")
            .await
        {
            Ok(s) => s.server,
            Err(ProviderError::NotFound { .. }) => {
                self.finish_cleanup(op, sid).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.remember_cleanup(zone, &server);
        let can = |a: &str| {
            server.allowed_actions.is_empty() || server.allowed_actions.iter().any(|x| x == a)
        };
        let result = match server.state.as_str() {
            "running" if can("terminate") => {
                self.api
                    .call(
                        op,
                        Method::POST,
                        &format!("{base}/action"),
                        &[],
                        Body::Json(json!({"action": "terminate"})),
                    )
                    .await
            }
            // `terminate` is refused on a stopped server: delete it; its
            // volumes are left detached and deleted once it is gone.
            "stopped" | "stopped in place" => {
                self.api
                    .call(op, Method::DELETE, &base, &[], Body::None)
                    .await
            }
            state => {
                debug!(
                    provider = PROVIDER_NAME,
                    server = sid,
                    state,
                    "terminate waits for a stable state"
                );
                return Ok(());
            }
        };
        match result {
            Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError> {
        let wanted = encode_tags(tags);
        let mut out = Vec::new();
        for zone in &self.zones {
            for s in self.list_servers("list", zone, &wanted).await? {
                out.push(self.machine(zone, &s));
            }
        }
        Ok(out)
    }

    async fn catalog(&self) -> Result<Catalog, ProviderError> {
        let mut types: Vec<InstanceType> = Vec::new();
        for zone in &self.zones {
            for t in self.zone_catalog("catalog", zone).await?.types {
                match types.iter_mut().find(|x| x.name == t.name) {
                    Some(x) => x.zones.extend(t.zones),
                    None => types.push(t),
                }
            }
        }
        types.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Catalog {
            zones: self.zones.iter().map(|z| catalog::zone(z)).collect(),
            instance_types: types,
        })
    }

    fn engine(&self) -> Option<EngineSpec> {
        Some(EngineSpec::VllmContainer {
            port: self.settings.engine_port,
            image: self.settings.engine_image.clone(),
            cache_dir: MODEL_CACHE_DIR.to_string(),
            args: Vec::new(),
            runtime: "docker".to_string(),
        })
    }

    async fn list_resources(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Resource>, ProviderError> {
        let op = "list_resources";
        let wanted = encode_tags(tags);
        let mut out = Vec::new();
        for zone in &self.zones {
            for ip in self.list_ips(op, zone, &wanted).await? {
                out.push(Resource {
                    kind: ResourceKind::Ip,
                    id: ip.id,
                    zone: zone.clone(),
                    tags: decode_tags(&ip.tags, &self.settings.tags),
                    attached_to: ip.server.map(|s| Self::machine_id(zone, &s.id)),
                    // The Instance API gives IPs no creation date.
                    created_at: Utc::now(),
                });
            }
            for v in self.list_volumes(op, zone, &wanted).await? {
                out.push(Resource {
                    kind: ResourceKind::Volume,
                    attached_to: v
                        .references
                        .iter()
                        .find(|r| r.product_resource_type == "instance_server")
                        .map(|r| Self::machine_id(zone, &r.product_resource_id)),
                    id: v.id,
                    zone: zone.clone(),
                    tags: decode_tags(&v.tags, &self.settings.tags),
                    created_at: v.created_at.unwrap_or_else(Utc::now),
                });
            }
        }
        Ok(out)
    }

    async fn delete_resource(&self, r: &Resource) -> Result<(), ProviderError> {
        let op = "delete_resource";
        let zone = &r.zone;
        if !is_zone(zone) {
            return Err(ProviderError::InvalidRequest {
                field: "zone",
                message: format!("{zone:?} is not a zone"),
            });
        }
        let ok = |res: Result<Answer, ProviderError>| match res {
            Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        };
        match r.kind {
            ResourceKind::Ip => {
                let path = format!("/instance/v1/zones/{zone}/ips/{}", r.id);
                if r.attached_to.is_some() {
                    ok(self
                        .api
                        .call(
                            op,
                            Method::PATCH,
                            &path,
                            &[],
                            Body::Json(json!({"server": null})),
                        )
                        .await)?;
                }
                ok(self
                    .api
                    .call(op, Method::DELETE, &path, &[], Body::None)
                    .await)
            }
            ResourceKind::Volume => {
                if let Some(server) = &r.attached_to {
                    let (_, sid) = self.parse_id(server)?;
                    ok(self
                        .api
                        .call(
                            op,
                            Method::POST,
                            &format!("/instance/v1/zones/{zone}/servers/{sid}/detach-volume"),
                            &[],
                            Body::Json(json!({"volume_id": r.id, "is_block_volume": true})),
                        )
                        .await)?;
                }
                ok(self
                    .api
                    .call(
                        op,
                        Method::DELETE,
                        &format!("/block/v1/zones/{zone}/volumes/{}", r.id),
                        &[],
                        Body::None,
                    )
                    .await)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/scaleway/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn tags_round_trip() {
        let mut m = BTreeMap::new();
        m.insert(tags::CLUSTER.to_string(), "c1".to_string());
        m.insert(tags::INSTANCE.to_string(), "i-1".to_string());
        m.insert("team".to_string(), "a=b".to_string());
        let enc = encode_tags(&m);
        assert_eq!(
            enc,
            vec![
                "gpufleet",
                "gpufleet-cluster=c1",
                "gpufleet-instance=i-1",
                "team=a=b"
            ]
        );
        let mut with_extra = enc.clone();
        with_extra.push("env=prod".into());
        with_extra.push("plain".into());
        assert_eq!(decode_tags(&with_extra, &["env=prod".to_string()]), m);
    }

    #[test]
    fn states_map() {
        assert_eq!(map_state("running"), MachineState::Running);
        assert_eq!(map_state("starting"), MachineState::Pending);
        assert_eq!(map_state("stopping"), MachineState::Stopping);
        assert_eq!(map_state("stopped"), MachineState::Stopped);
        assert_eq!(map_state("stopped in place"), MachineState::Stopped);
        assert_eq!(map_state("locked"), MachineState::Pending);
        assert_eq!(map_state("something new"), MachineState::Pending);
    }

    #[test]
    fn recorded_server_answer_parses() {
        let s: ServerEnvelope = serde_json::from_slice(&fixture("server_create.json")).unwrap();
        assert_eq!(s.server.state, "stopped");
        assert_eq!(
            s.server.public_ips[0].address.as_deref(),
            Some("51.158.77.33")
        );
        assert_eq!(s.server.volumes["0"].volume_type, "sbs_volume");
        let s: ServerEnvelope =
            serde_json::from_slice(&fixture("server_create_l40s.json")).unwrap();
        assert_eq!(s.server.commercial_type, "L40S-1-48G");
    }

    #[test]
    fn volume_sizes() {
        assert_eq!(model_volume_gib(100, 0), 100);
        assert_eq!(model_volume_gib(100, 15_000), 100); // 7B: 15 GB × 2.5 + 10 < 100
        assert_eq!(model_volume_gib(100, 140_000), 352); // 70B
        assert_eq!(gib_to_api_bytes(50), 54_000_000_000);
        assert_eq!(gib_to_api_bytes(100) % 1_000_000_000, 0);
        assert!(gib_to_api_bytes(100) >= 100 << 30);
    }

    #[test]
    fn catalog_maps_the_recorded_pages() {
        let mut types = Vec::new();
        for p in 1..=3 {
            let page: api::ProductsPage =
                serde_json::from_slice(&fixture(&format!("products_servers_page{p}.json")))
                    .unwrap();
            types.extend(
                page.servers
                    .iter()
                    .filter(|(_, p)| p.gpu > 0)
                    .map(|(n, p)| catalog::instance_type(n, p, "fr-par-1")),
            );
        }
        let l4 = types.iter().find(|t| t.name == "L4-1-24G").unwrap();
        assert_eq!(l4.gpu.model, "NVIDIA L4");
        assert_eq!(l4.gpu.count, 1);
        assert_eq!(l4.gpu.vram_mib, 24_576);
        assert_eq!(l4.gpu.power_limit_w, 72.0);
        assert_eq!(l4.vcpus, 8);
        assert_eq!(l4.ram_mib, 49_152);
        assert_eq!(l4.price_per_hour, 0.7875);
        assert_eq!(l4.currency, "EUR");
        let l4x8 = types.iter().find(|t| t.name == "L4-8-24G").unwrap();
        assert_eq!(l4x8.gpu.count, 8);
        // A GPU type on the last page too.
        let render = types.iter().find(|t| t.name == "RENDER-S").unwrap();
        assert_eq!(render.gpu.model, "Tesla P100-PCIE-16GB");
        assert_eq!(
            nvml_gpu_name("H100", "H100-SXM-8-80G"),
            "NVIDIA H100 80GB HBM3"
        );
        assert_eq!(power_limit_w(&nvml_gpu_name("H100", "H100-1-80G")), 350.0);
        assert_eq!(power_limit_w(&nvml_gpu_name("L40S", "L40S-1-48G")), 350.0);
        assert_eq!(catalog::zone("fr-par-2").description, "Paris 2");
    }
}
