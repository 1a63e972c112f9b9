//! Credentials (Scaleway's SDK/CLI conventions) and the `[providers.scaleway]`
//! settings of `gpufleet.toml`.
//!
//! Credentials come, in this order of precedence (the one the Scaleway SDKs
//! document): the environment (`SCW_ACCESS_KEY`, `SCW_SECRET_KEY`,
//! `SCW_DEFAULT_PROJECT_ID`, `SCW_DEFAULT_ORGANIZATION_ID`, `SCW_DEFAULT_ZONE`,
//! `SCW_DEFAULT_REGION`, `SCW_API_URL`), then the active profile of the `scw`
//! config file (`SCW_PROFILE`, else the file's `active_profile`), then the
//! file's top-level keys. The file is `$SCW_CONFIG_PATH`, else
//! `$XDG_CONFIG_HOME/scw/config.yaml`, else `~/.config/scw/config.yaml`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The default API endpoint.
pub const DEFAULT_API_URL: &str = "https://api.scaleway.com";
/// The zone used when neither the environment nor the config file names one.
pub const DEFAULT_ZONE: &str = "fr-par-2";

/// The secret half of an API key. Its `Debug` and `Display` print `***`;
/// only [`SecretKey::expose`] gives the value (for the `X-Auth-Token` header).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The value itself. Only the HTTP client calls it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Who gpufleet is at Scaleway, and where it talks to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalewayConfig {
    /// `SCW_ACCESS_KEY` / `access_key`.
    pub access_key: String,
    /// `SCW_SECRET_KEY` / `secret_key`.
    pub secret_key: SecretKey,
    /// `SCW_DEFAULT_PROJECT_ID` / `default_project_id`; when absent, the
    /// organization id (which is the id of the organization's default project).
    pub project_id: String,
    /// `SCW_DEFAULT_ORGANIZATION_ID` / `default_organization_id`.
    pub organization_id: Option<String>,
    /// `SCW_DEFAULT_ZONE` / `default_zone` (default [`DEFAULT_ZONE`]).
    pub default_zone: String,
    /// `SCW_DEFAULT_REGION` / `default_region` (default: the zone's region).
    pub default_region: String,
    /// `SCW_API_URL` / `api_url` (default [`DEFAULT_API_URL`]), no trailing `/`.
    pub api_url: String,
    /// The config-file profile the values came from, if any.
    pub profile: Option<String>,
}

/// Why the Scaleway configuration cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Some credentials are set, but not all that are needed.
    #[error("Scaleway credentials are incomplete: {variable} is not set (in the environment or the scw config file)")]
    Missing { variable: &'static str },
    /// A value is malformed. The message never contains the secret key.
    #[error("invalid {variable}: {message}")]
    Invalid {
        variable: &'static str,
        message: String,
    },
    /// The config file cannot be read or parsed.
    #[error("scw config file {path}: {message}")]
    File { path: PathBuf, message: String },
    /// `SCW_PROFILE` / `active_profile` names a profile the file lacks.
    #[error("scw config file {path} has no profile {profile:?}")]
    UnknownProfile { path: PathBuf, profile: String },
}

/// One level of the config file (top level or one profile).
#[derive(Debug, Clone, Default, PartialEq)]
struct FileValues(BTreeMap<String, String>);

/// The parts of the `scw` config file gpufleet reads.
#[derive(Debug, Clone, Default, PartialEq)]
struct ConfigFile {
    top: FileValues,
    active_profile: Option<String>,
    profiles: BTreeMap<String, FileValues>,
}

impl ScalewayConfig {
    /// Reads credentials the way Scaleway's SDKs do. `env` looks a variable
    /// up; `home` is the user's home directory (for `~/.config/scw`).
    ///
    /// `Ok(None)`: no credentials anywhere (Scaleway is not offered).
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        home: Option<&Path>,
    ) -> Result<Option<Self>, ConfigError> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let path = match env("SCW_CONFIG_PATH") {
            Some(p) => Some(PathBuf::from(p)),
            None => match env("XDG_CONFIG_HOME") {
                Some(x) => Some(Path::new(&x).join("scw").join("config.yaml")),
                None => home.map(|h| h.join(".config").join("scw").join("config.yaml")),
            },
        };
        let file = match &path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => parse_config_file(&text).map_err(|message| ConfigError::File {
                    path: p.clone(),
                    message,
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => ConfigFile::default(),
                Err(e) => {
                    return Err(ConfigError::File {
                        path: p.clone(),
                        message: e.to_string(),
                    })
                }
            },
            None => ConfigFile::default(),
        };
        let profile_name = env("SCW_PROFILE").or_else(|| file.active_profile.clone());
        let profile = match &profile_name {
            Some(name) => match file.profiles.get(name) {
                Some(p) => Some(p),
                // "default" names the top-level values in the scw CLI.
                None if name == "default" => None,
                None => {
                    return Err(ConfigError::UnknownProfile {
                        path: path.clone().unwrap_or_default(),
                        profile: name.clone(),
                    })
                }
            },
            None => None,
        };
        let get = |var: &str, key: &str| -> Option<String> {
            env(var)
                .or_else(|| profile.and_then(|p| p.0.get(key).cloned()))
                .or_else(|| file.top.0.get(key).cloned())
                .filter(|v| !v.trim().is_empty())
        };
        let access_key = get("SCW_ACCESS_KEY", "access_key");
        let secret_key = get("SCW_SECRET_KEY", "secret_key");
        let project_id = get("SCW_DEFAULT_PROJECT_ID", "default_project_id");
        let organization_id = get("SCW_DEFAULT_ORGANIZATION_ID", "default_organization_id");
        if access_key.is_none()
            && secret_key.is_none()
            && project_id.is_none()
            && organization_id.is_none()
        {
            return Ok(None);
        }
        let access_key = access_key.ok_or(ConfigError::Missing {
            variable: "SCW_ACCESS_KEY",
        })?;
        let secret_key = secret_key.ok_or(ConfigError::Missing {
            variable: "SCW_SECRET_KEY",
        })?;
        let project_id =
            project_id
                .or_else(|| organization_id.clone())
                .ok_or(ConfigError::Missing {
                    variable: "SCW_DEFAULT_PROJECT_ID",
                })?;
        if !(access_key.starts_with("SCW") && access_key.len() == 20) {
            return Err(ConfigError::Invalid {
                variable: "SCW_ACCESS_KEY",
                message: "expected SCW followed by 17 characters".into(),
            });
        }
        if !is_uuid(&secret_key) {
            return Err(ConfigError::Invalid {
                variable: "SCW_SECRET_KEY",
                message: "expected a UUID (the value is not shown)".into(),
            });
        }
        if !is_uuid(&project_id) {
            return Err(ConfigError::Invalid {
                variable: "SCW_DEFAULT_PROJECT_ID",
                message: format!("expected a UUID, got {project_id:?}"),
            });
        }
        let default_zone =
            get("SCW_DEFAULT_ZONE", "default_zone").unwrap_or_else(|| DEFAULT_ZONE.to_string());
        if !is_zone(&default_zone) {
            return Err(ConfigError::Invalid {
                variable: "SCW_DEFAULT_ZONE",
                message: format!("{default_zone:?} is not a zone like fr-par-2"),
            });
        }
        let default_region = get("SCW_DEFAULT_REGION", "default_region")
            .unwrap_or_else(|| region_of(&default_zone).to_string());
        let api_url = get("SCW_API_URL", "api_url")
            .unwrap_or_else(|| DEFAULT_API_URL.to_string())
            .trim_end_matches('/')
            .to_string();
        if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
            return Err(ConfigError::Invalid {
                variable: "SCW_API_URL",
                message: format!("{api_url:?} is not an http(s) URL"),
            });
        }
        Ok(Some(Self {
            access_key,
            secret_key: SecretKey::new(secret_key),
            project_id,
            organization_id,
            default_zone,
            default_region,
            api_url,
            profile: profile.and(profile_name),
        }))
    }

    /// [`ScalewayConfig::from_env`] with the process environment and `$HOME`.
    pub fn from_process_env() -> Result<Option<Self>, ConfigError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Self::from_env(|k| std::env::var(k).ok(), home.as_deref())
    }
}

/// `fr-par-2` → `fr-par`.
pub fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map(|(r, _)| r).unwrap_or(zone)
}

/// A zone name like `fr-par-2`: two letters, three letters, a number.
pub fn is_zone(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 3
        && parts[0].len() == 2
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[1].len() == 3
        && parts[1].bytes().all(|b| b.is_ascii_lowercase())
        && !parts[2].is_empty()
        && parts[2].bytes().all(|b| b.is_ascii_digit())
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Parses the subset of YAML the `scw` config file uses: `key: value` at the
/// top level, `active_profile: name`, and `profiles:` holding one mapping of
/// `key: value` per profile name. Comments and quoted scalars are understood;
/// keys gpufleet does not read are kept but ignored.
fn parse_config_file(text: &str) -> Result<ConfigFile, String> {
    let mut out = ConfigFile::default();
    // (indent of the `profiles:` key's children, current profile name and its indent)
    let mut in_profiles: Option<usize> = None;
    let mut profile: Option<(String, usize)> = None;
    let mut skip_below: Option<usize> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = strip_comment(raw);
        if line.trim().is_empty() || line.trim() == "---" {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let Some((key, value)) = line.trim().split_once(':') else {
            return Err(format!("line {}: expected `key: value`", n + 1));
        };
        let key = unquote(key.trim());
        let value = unquote(value.trim());
        if let Some(s) = skip_below {
            if indent > s {
                continue;
            }
            skip_below = None;
        }
        if indent == 0 {
            profile = None;
            in_profiles = None;
            match key.as_str() {
                "profiles" if value.is_empty() => in_profiles = Some(0),
                "active_profile" => out.active_profile = Some(value),
                _ if value.is_empty() => skip_below = Some(0),
                _ => {
                    out.top.0.insert(key, value);
                }
            }
            continue;
        }
        if in_profiles.is_none() {
            continue;
        }
        match &profile {
            Some((_, pindent)) if indent > *pindent => {
                let (name, _) = profile.as_ref().expect("matched Some");
                if value.is_empty() {
                    skip_below = Some(indent);
                } else {
                    out.profiles
                        .entry(name.clone())
                        .or_default()
                        .0
                        .insert(key, value);
                }
            }
            _ => {
                out.profiles.entry(key.clone()).or_default();
                profile = Some((key, indent));
            }
        }
    }
    Ok(out)
}

fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"') | (None, '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if i == 0 || line[..i].ends_with(char::is_whitespace) => return &line[..i],
            _ => {}
        }
    }
    line
}

fn unquote(s: &str) -> String {
    let b = s.as_bytes();
    if b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[b.len() - 1] == b[0] {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

/// `[providers.scaleway]` in gpufleet.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalewaySettings {
    /// Zones machines may be made in and the catalog lists (e.g.
    /// `["fr-par-2", "nl-ams-1"]`). Empty: the credentials' default zone.
    pub zones: Vec<String>,
    /// Marketplace label of the OS image. Default `ubuntu_jammy_gpu_os_12`:
    /// Scaleway's GPU OS (NVIDIA driver, CUDA, Docker and the NVIDIA container
    /// toolkit preinstalled), the label the recorded API answers resolve to an
    /// `instance_sbs` image compatible with every GPU type (L4, L40S, H100...).
    pub image_label: String,
    /// Size of the root (SBS) volume, GiB (rounded up to whole GB, the API's unit).
    pub root_volume_gib: u64,
    /// Smallest model-cache volume, GiB. The volume is
    /// max(this, model weights × 2.5 + 10 GiB).
    pub model_volume_min_gib: u64,
    /// IOPS class of the model-cache volume (5000 or 15000).
    pub model_volume_iops: u32,
    /// Security group attached to every machine, created once per zone if
    /// missing: inbound drop except TCP `agent_port` and `engine_port`,
    /// outbound accept.
    pub security_group_name: String,
    /// Extra plain tags put on every resource.
    pub tags: Vec<String>,
    /// How long a zone's catalog (types, prices, stock) is cached, seconds.
    pub catalog_ttl_secs: u64,
    /// List only types with at least one GPU.
    pub gpu_only: bool,
    /// Timeout of every API call, milliseconds.
    pub request_timeout_ms: u64,
    /// The vLLM container image machines run.
    pub engine_image: String,
    /// Port of the engine on the machine.
    pub engine_port: u16,
    /// Port of the agent on the machine.
    pub agent_port: u16,
    /// Most API calls in flight at once.
    pub max_concurrent_requests: usize,
    /// Where the agent reads GPU figures: `nvml` on real GPU machines. An
    /// emulated machine without GPUs needs `simulated`.
    pub agent_gpu: String,
}

impl Default for ScalewaySettings {
    fn default() -> Self {
        Self {
            zones: Vec::new(),
            image_label: "ubuntu_jammy_gpu_os_12".into(),
            root_volume_gib: 50,
            model_volume_min_gib: 100,
            model_volume_iops: 5000,
            security_group_name: "gpufleet".into(),
            tags: Vec::new(),
            catalog_ttl_secs: 300,
            gpu_only: true,
            request_timeout_ms: 30_000,
            engine_image: "vllm/vllm-openai:v0.10.1".into(),
            engine_port: 8000,
            agent_port: gpufleet_proto::DEFAULT_AGENT_PORT,
            max_concurrent_requests: 8,
            agent_gpu: "nvml".into(),
        }
    }
}

impl ScalewaySettings {
    /// Checks the values; returns the zones to use (the default zone if none).
    pub fn validate(&self, config: &ScalewayConfig) -> Result<Vec<String>, ConfigError> {
        let zones = if self.zones.is_empty() {
            vec![config.default_zone.clone()]
        } else {
            self.zones.clone()
        };
        for z in &zones {
            if !is_zone(z) {
                return Err(ConfigError::Invalid {
                    variable: "providers.scaleway.zones",
                    message: format!("{z:?} is not a zone like fr-par-2"),
                });
            }
        }
        let bad = |variable, message: &str| {
            Err(ConfigError::Invalid {
                variable,
                message: message.to_string(),
            })
        };
        if self.image_label.trim().is_empty() {
            return bad("providers.scaleway.image_label", "must not be empty");
        }
        if self.root_volume_gib < 10 {
            return bad("providers.scaleway.root_volume_gib", "must be at least 10");
        }
        if self.model_volume_min_gib < 1 {
            return bad(
                "providers.scaleway.model_volume_min_gib",
                "must be at least 1",
            );
        }
        if self.security_group_name.trim().is_empty() {
            return bad(
                "providers.scaleway.security_group_name",
                "must not be empty",
            );
        }
        if self.request_timeout_ms == 0 {
            return bad("providers.scaleway.request_timeout_ms", "must be positive");
        }
        if self.engine_port == 0 || self.agent_port == 0 || self.engine_port == self.agent_port {
            return bad(
                "providers.scaleway.engine_port",
                "engine_port and agent_port must be distinct and non-zero",
            );
        }
        if self.max_concurrent_requests == 0 {
            return bad(
                "providers.scaleway.max_concurrent_requests",
                "must be positive",
            );
        }
        if self.tags.iter().any(|t| t.starts_with("gpufleet")) {
            return bad(
                "providers.scaleway.tags",
                "tags starting with `gpufleet` are gpufleet's own",
            );
        }
        Ok(zones)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const AK: &str = "SCWXXXXXXXXXXXXXXXXX";
    const SK: &str = "11111111-2222-3333-4444-555555555555";
    const PJ: &str = "105bdce1-64c0-48ab-899d-868455867ecf";
    const PJ2: &str = "0931e629-5ea3-4c18-856b-df904623d0ed";

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn nothing_set_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ScalewayConfig::from_env(env(&[]), Some(dir.path())),
            Ok(None)
        );
    }

    #[test]
    fn environment_alone() {
        let c = ScalewayConfig::from_env(
            env(&[
                ("SCW_ACCESS_KEY", AK),
                ("SCW_SECRET_KEY", SK),
                ("SCW_DEFAULT_PROJECT_ID", PJ),
                ("SCW_DEFAULT_ZONE", "nl-ams-1"),
                ("SCW_API_URL", "http://127.0.0.1:9/"),
            ]),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.default_zone, "nl-ams-1");
        assert_eq!(c.default_region, "nl-ams");
        assert_eq!(c.api_url, "http://127.0.0.1:9");
        assert_eq!(c.secret_key.expose(), SK);
    }

    #[test]
    fn partial_credentials_name_the_missing_variable() {
        let e =
            ScalewayConfig::from_env(env(&[("SCW_SECRET_KEY", SK), ("SCW_ACCESS_KEY", AK)]), None)
                .unwrap_err();
        assert_eq!(
            e,
            ConfigError::Missing {
                variable: "SCW_DEFAULT_PROJECT_ID"
            }
        );
        let e = ScalewayConfig::from_env(env(&[("SCW_SECRET_KEY", SK)]), None).unwrap_err();
        assert_eq!(
            e,
            ConfigError::Missing {
                variable: "SCW_ACCESS_KEY"
            }
        );
        assert!(!e.to_string().contains(SK));
        // The organization id stands in for the project id (its default project).
        let c = ScalewayConfig::from_env(
            env(&[
                ("SCW_SECRET_KEY", SK),
                ("SCW_ACCESS_KEY", AK),
                ("SCW_DEFAULT_ORGANIZATION_ID", PJ),
            ]),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.project_id, PJ);
    }

    #[test]
    fn a_malformed_secret_is_not_echoed() {
        let e = ScalewayConfig::from_env(
            env(&[
                ("SCW_SECRET_KEY", "not-a-uuid-but-secret"),
                ("SCW_ACCESS_KEY", AK),
                ("SCW_DEFAULT_PROJECT_ID", PJ),
            ]),
            None,
        )
        .unwrap_err();
        assert!(!format!("{e} {e:?}").contains("not-a-uuid-but-secret"));
    }

    const FILE: &str = r#"# scw config
access_key: SCWTOPLEVELXXXXXXXXX
secret_key: "11111111-2222-3333-4444-555555555555"
default_project_id: 105bdce1-64c0-48ab-899d-868455867ecf
default_zone: fr-par-1
send_telemetry: true
active_profile: work
profiles:
  work:
    access_key: SCWPROFILEXXXXXXXXXX # the work key
    default_project_id: '0931e629-5ea3-4c18-856b-df904623d0ed'
  other:
    default_zone: pl-waw-2
"#;

    #[test]
    fn environment_over_profile_over_top_level() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join(".config/scw");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(cfg.join("config.yaml"), FILE).unwrap();
        // Profile `work` (active_profile) over the top level.
        let c = ScalewayConfig::from_env(env(&[]), Some(dir.path()))
            .unwrap()
            .unwrap();
        assert_eq!(c.access_key, "SCWPROFILEXXXXXXXXXX");
        assert_eq!(c.project_id, PJ2);
        assert_eq!(c.secret_key.expose(), SK); // from the top level
        assert_eq!(c.default_zone, "fr-par-1");
        assert_eq!(c.profile.as_deref(), Some("work"));
        // SCW_PROFILE over active_profile; environment over everything.
        let c = ScalewayConfig::from_env(
            env(&[("SCW_PROFILE", "other"), ("SCW_DEFAULT_PROJECT_ID", PJ)]),
            Some(dir.path()),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.access_key, "SCWTOPLEVELXXXXXXXXX");
        assert_eq!(c.default_zone, "pl-waw-2");
        assert_eq!(c.project_id, PJ);
        // SCW_CONFIG_PATH wins over the home directory.
        let other = dir.path().join("elsewhere.yaml");
        std::fs::write(
            &other,
            format!("access_key: {AK}\nsecret_key: {SK}\ndefault_project_id: {PJ}\n"),
        )
        .unwrap();
        let c = ScalewayConfig::from_env(
            env(&[("SCW_CONFIG_PATH", other.to_str().unwrap())]),
            Some(dir.path()),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.access_key, AK);
        // An unknown profile is an error.
        let e = ScalewayConfig::from_env(env(&[("SCW_PROFILE", "nope")]), Some(dir.path()))
            .unwrap_err();
        assert!(matches!(e, ConfigError::UnknownProfile { .. }));
    }

    #[test]
    fn the_secret_never_prints() {
        let s = SecretKey::new(SK);
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        let c = ScalewayConfig {
            access_key: AK.into(),
            secret_key: s,
            project_id: PJ.into(),
            organization_id: None,
            default_zone: "fr-par-2".into(),
            default_region: "fr-par".into(),
            api_url: DEFAULT_API_URL.into(),
            profile: None,
        };
        assert!(!format!("{c:?}").contains(SK));
    }

    #[test]
    fn settings_defaults_and_validation() {
        let s: ScalewaySettings = toml_like_default();
        assert!(s.gpu_only);
        assert!(is_zone("fr-par-2") && is_zone("pl-waw-3"));
        assert!(!is_zone("fr-par") && !is_zone("FR-par-1") && !is_zone("fr-pa-1"));
        let bad = ScalewaySettings {
            zones: vec!["paris".into()],
            ..Default::default()
        };
        let c = ScalewayConfig::from_env(
            env(&[
                ("SCW_ACCESS_KEY", AK),
                ("SCW_SECRET_KEY", SK),
                ("SCW_DEFAULT_PROJECT_ID", PJ),
            ]),
            None,
        )
        .unwrap()
        .unwrap();
        assert!(bad.validate(&c).is_err());
        assert_eq!(s.validate(&c).unwrap(), vec![DEFAULT_ZONE.to_string()]);
        let unknown: Result<ScalewaySettings, _> =
            serde_json::from_str(r#"{"zones":["fr-par-2"],"bogus":1}"#);
        assert!(unknown.is_err());
    }

    fn toml_like_default() -> ScalewaySettings {
        serde_json::from_str("{}").unwrap()
    }
}
