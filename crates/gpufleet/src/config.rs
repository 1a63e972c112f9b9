//! `gpufleet up`'s configuration: a TOML file (every field has a default),
//! then `GPUFLEET_*` environment variables for the top-level fields, then
//! command-line flags. See `gpufleet.example.toml` at the repository root.

use anyhow::Context;
use gpufleet_control::ControlConfig;
use gpufleet_providers::mock::MockConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default data directory when neither the file, `GPUFLEET_DATA_DIR` nor
/// `--data-dir` names one.
pub const DEFAULT_DATA_DIR: &str = ".gpufleet";
/// Default address of the HTTP API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Name of the admin token file inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Everything `gpufleet up` runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpConfig {
    /// Address the HTTP API (and the agent endpoints) listen on; port 0 picks
    /// a free port. Env: `GPUFLEET_LISTEN`.
    pub listen: SocketAddr,
    /// Directory for the database, the admin token and the Mock provider's
    /// machines (`<data_dir>/mock`). Env: `GPUFLEET_DATA_DIR`.
    pub data_dir: PathBuf,
    /// Database URL: `sqlite://...` or `postgres://...`. Empty: the SQLite
    /// file `<data_dir>/gpufleet.db`. Env: `GPUFLEET_DATABASE_URL`.
    pub database_url: String,
    /// File holding the admin token (read, or created with a fresh token,
    /// mode 0600). Empty: `<data_dir>/admin-token`. `GPUFLEET_ADMIN_TOKEN`,
    /// when set, takes precedence over any file. Env: `GPUFLEET_ADMIN_TOKEN_FILE`.
    pub admin_token_file: String,
    /// Longest a SIGINT/SIGTERM shutdown may take before the process exits anyway.
    pub shutdown_timeout_secs: u64,
    /// The address cloud machines reach the control plane at, e.g.
    /// `https://fleet.example.com` (their agents register and heartbeat
    /// there, and download the agent binary). Empty: no cloud provider can
    /// be used. Env: `GPUFLEET_PUBLIC_URL`.
    pub public_url: String,
    /// The HTTPS listener of `public_url` (`[tls]`).
    pub tls: crate::tls::TlsSection,
    /// The control plane: heartbeats, timeouts, retries, reconcile period,
    /// engine and models.
    pub control: ControlConfig,
    /// The Mock provider (machines are local processes on loopback IPs).
    pub mock: MockSection,
    /// The OpenAI-compatible router (`/v1/...`): policy, timeouts, retries,
    /// circuit breaker, API key cache, usage flushing.
    pub router: gpufleet_router::RouterConfig,
    /// Cloud providers (`[providers.scaleway]`); credentials come from their
    /// own conventions (`SCW_*`, the `scw` CLI's profiles), never from here.
    pub providers: ProvidersSection,
    /// Users' sign-in (`[auth]`): sessions, passwords, single sign-on.
    pub auth: AuthSection,
}

/// `[auth]`: how users sign in. The admin token always works.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// How long a console session lasts.
    pub session_ttl_hours: u64,
    /// Whether users may sign in with a password (off: single sign-on only).
    pub password_sign_in: bool,
    /// OpenID Connect single sign-on (`[auth.oidc]`): `issuer_url`,
    /// `client_id`, `client_secret`, `redirect_url` (the public URL +
    /// `/auth/oidc/callback`), `scopes`, `display_name`.
    pub oidc: Option<gpufleet_api::oidc::OidcConfig>,
    /// When set, `/metrics` answers only scrapers that send it as a bearer
    /// token (or the admin token). `GPUFLEET_METRICS_TOKEN` sets it without
    /// writing it here. (A secret: printed as `***`.)
    pub metrics_token: Option<gpufleet_api::oidc::ClientSecret>,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            session_ttl_hours: 12,
            password_sign_in: true,
            oidc: None,
            metrics_token: None,
        }
    }
}

/// `[providers.*]`: settings of the cloud providers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersSection {
    /// Scaleway, offered when `SCW_ACCESS_KEY`/`SCW_SECRET_KEY` (or an `scw`
    /// profile) are set.
    pub scaleway: gpufleet_providers::scaleway::ScalewaySettings,
}

impl Default for UpConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("default listen address is valid"),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            database_url: String::new(),
            admin_token_file: String::new(),
            shutdown_timeout_secs: 10,
            public_url: String::new(),
            tls: crate::tls::TlsSection::default(),
            control: ControlConfig::default(),
            mock: MockSection::default(),
            router: gpufleet_router::RouterConfig::default(),
            providers: ProvidersSection::default(),
            auth: AuthSection::default(),
        }
    }
}

/// The Mock provider's settings (`[mock]`). Its data directory is
/// `<data_dir>/mock` and its agent program is this very binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockSection {
    /// A `gpufleet mock-provider` service to use instead of running the Mock
    /// provider in this process (how several replicas share its machines),
    /// e.g. `http://127.0.0.1:7600`. Empty: run it here.
    pub url: String,
    /// Loopback addresses handed to machines, an IPv4 CIDR inside 127.0.0.0/8.
    pub ip_pool: String,
    /// Time from create until a machine's IP becomes visible, in milliseconds.
    pub ip_delay_ms: u64,
    /// Time from create until a machine's agent is started, in milliseconds.
    pub boot_delay_ms: u64,
    /// Time between SIGTERM and SIGKILL when a machine is terminated, in milliseconds.
    pub terminate_grace_ms: u64,
    /// Time between noticing a dead agent and starting it again, in milliseconds.
    pub agent_restart_delay_ms: u64,
    /// Most live machines per zone, e.g. `{ "local-1" = 2 }`; past it a
    /// create fails with out_of_capacity (as a sold-out cloud zone does).
    pub zone_capacity: std::collections::BTreeMap<String, u32>,
}

impl Default for MockSection {
    fn default() -> Self {
        let d = MockConfig::new("unused", "unused");
        Self {
            url: String::new(),
            ip_pool: d.ip_pool,
            ip_delay_ms: d.ip_delay_ms,
            boot_delay_ms: d.boot_delay_ms,
            terminate_grace_ms: d.terminate_grace_ms,
            agent_restart_delay_ms: d.agent_restart_delay_ms,
            zone_capacity: d.zone_capacity,
        }
    }
}

impl MockSection {
    /// The provider configuration for machines under `data_dir`, whose agent
    /// is `agent_program agent --gpu simulated ...`: Mock machines simulate
    /// the GPUs of their instance type even where this host has real ones.
    pub fn to_mock_config(&self, data_dir: PathBuf, agent_program: PathBuf) -> MockConfig {
        let mut c = MockConfig::new(data_dir, agent_program);
        c.agent_args = vec![
            "agent".to_string(),
            "--gpu".to_string(),
            "simulated".to_string(),
        ];
        c.ip_pool = self.ip_pool.clone();
        c.ip_delay_ms = self.ip_delay_ms;
        c.boot_delay_ms = self.boot_delay_ms;
        c.terminate_grace_ms = self.terminate_grace_ms;
        c.agent_restart_delay_ms = self.agent_restart_delay_ms;
        c.zone_capacity = self.zone_capacity.clone();
        c
    }
}

/// Values given on the command line; they win over file and environment.
#[derive(Debug, Clone, Default)]
pub struct UpOverrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub public_url: Option<String>,
}

impl UpConfig {
    /// Parses a config file's text.
    pub fn from_toml(text: &str) -> Result<UpConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// File (if any), then `GPUFLEET_*` from `env`, then `flags`.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &UpOverrides,
    ) -> anyhow::Result<UpConfig> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                UpConfig::from_toml(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => UpConfig::default(),
        };
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(v) = env("GPUFLEET_LISTEN") {
            config.listen = v
                .parse()
                .with_context(|| format!("GPUFLEET_LISTEN={v:?} is not an address"))?;
        }
        if let Some(v) = env("GPUFLEET_DATA_DIR") {
            config.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("GPUFLEET_DATABASE_URL") {
            config.database_url = v;
        }
        if let Some(v) = env("GPUFLEET_ADMIN_TOKEN_FILE") {
            config.admin_token_file = v;
        }
        if let Some(v) = env("GPUFLEET_PUBLIC_URL") {
            config.public_url = v;
        }
        if let Some(v) = flags.listen {
            config.listen = v;
        }
        if let Some(v) = &flags.data_dir {
            config.data_dir = v.clone();
        }
        if let Some(v) = &flags.database_url {
            config.database_url = v.clone();
        }
        if let Some(v) = &flags.public_url {
            config.public_url = v.clone();
        }
        config.public_url = config.public_url.trim_end_matches('/').to_string();
        if !config.public_url.is_empty()
            && !config.public_url.starts_with("https://")
            && !config.public_url.starts_with("http://")
        {
            anyhow::bail!(
                "public URL {:?} must start with https:// (or http:// on a trusted network)",
                config.public_url
            );
        }
        if let Err((field, why)) = config.router.validate() {
            anyhow::bail!("[router] {field}: {why}");
        }
        if !(1..=24 * 90).contains(&config.auth.session_ttl_hours) {
            anyhow::bail!("[auth] session_ttl_hours: must be between 1 and 2160 (90 days)");
        }
        if let Some(t) = env("GPUFLEET_METRICS_TOKEN") {
            config.auth.metrics_token = Some(gpufleet_api::oidc::ClientSecret::new(t.trim()));
        }
        if let Some(t) = &config.auth.metrics_token {
            let t = t.expose();
            if t.trim().len() < 16 || t.trim() != t {
                anyhow::bail!(
                    "[auth] metrics_token: must be at least 16 characters, without spaces around it (or set GPUFLEET_METRICS_TOKEN)"
                );
            }
        }
        if let Some(oidc) = &mut config.auth.oidc {
            // The client secret may stay out of the file.
            if oidc.client_secret.is_none() {
                if let Ok(s) = std::env::var("GPUFLEET_OIDC_CLIENT_SECRET") {
                    if !s.trim().is_empty() {
                        oidc.client_secret = Some(gpufleet_api::oidc::ClientSecret::new(s.trim()));
                    }
                }
            }
            if let Err(e) = oidc.validate() {
                anyhow::bail!("[auth] {e}");
            }
        }
        Ok(config)
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("gpufleet.db").display()
            )
        } else {
            self.database_url.clone()
        }
    }

    /// The admin token file in effect.
    pub fn admin_token_path(&self) -> PathBuf {
        if self.admin_token_file.is_empty() {
            self.data_dir.join(ADMIN_TOKEN_FILE)
        } else {
            PathBuf::from(&self.admin_token_file)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const EXAMPLE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../gpufleet.example.toml"
    ));

    #[test]
    fn the_example_config_parses_and_holds_the_defaults() {
        let parsed = UpConfig::from_toml(EXAMPLE).expect("gpufleet.example.toml parses");
        assert_eq!(parsed.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(parsed.data_dir, PathBuf::from(".gpufleet"));
        assert_eq!(parsed.control.heartbeat_interval_ms, 5_000);
        assert_eq!(parsed.mock.ip_pool, "127.77.0.0/16");
        assert_eq!(
            parsed.control.models.len(),
            ControlConfig::default().models.len()
        );
        assert_eq!(
            parsed,
            UpConfig::default(),
            "the example documents the defaults"
        );
    }

    #[test]
    fn an_empty_file_is_all_defaults_and_typos_are_rejected() {
        assert_eq!(UpConfig::from_toml("").unwrap(), UpConfig::default());
        let err = UpConfig::from_toml("listen_addr = \"1.2.3.4:5\"").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = UpConfig::from_toml("[mock]\nboot_delay = 5\n").unwrap_err();
        assert!(err.to_string().contains("boot_delay"), "{err}");
    }

    #[test]
    fn the_metrics_token_comes_from_the_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[auth]\nmetrics_token = \"short\"\n").unwrap();
        let none = |_: &str| None;
        let err = UpConfig::load(Some(&file), none, &UpOverrides::default()).unwrap_err();
        assert!(err.to_string().contains("[auth] metrics_token"), "{err}");
        let env =
            |k: &str| (k == "GPUFLEET_METRICS_TOKEN").then(|| "from-the-environment-42".into());
        let c = UpConfig::load(Some(&file), env, &UpOverrides::default()).unwrap();
        let token = c.auth.metrics_token.as_ref().unwrap();
        assert_eq!(token.expose(), "from-the-environment-42");
        // A secret: never in a dump of the configuration.
        assert!(!format!("{c:?}").contains("from-the-environment"));
        assert!(!toml::to_string(&c)
            .unwrap()
            .contains("from-the-environment"));
        assert_eq!(
            UpConfig::load(None, none, &UpOverrides::default())
                .unwrap()
                .auth
                .metrics_token,
            None
        );
    }

    #[test]
    fn flags_beat_environment_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\ndata_dir = \"/from/file\"\n[mock]\nboot_delay_ms = 7\n",
        )
        .unwrap();
        let env: HashMap<&str, &str> = [
            ("GPUFLEET_LISTEN", "127.0.0.1:2"),
            ("GPUFLEET_DATA_DIR", "/from/env"),
        ]
        .into();
        let lookup = |k: &str| env.get(k).map(|v| v.to_string());
        let c = UpConfig::load(Some(&file), lookup, &UpOverrides::default()).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.data_dir, PathBuf::from("/from/env"));
        assert_eq!(c.mock.boot_delay_ms, 7);
        assert_eq!(c.database_url(), "sqlite:///from/env/gpufleet.db?mode=rwc");
        let flags = UpOverrides {
            listen: Some("127.0.0.1:3".parse().unwrap()),
            data_dir: Some("/from/flag".into()),
            database_url: Some("postgres://x".into()),
            public_url: None,
        };
        let c = UpConfig::load(Some(&file), lookup, &flags).unwrap();
        assert_eq!(c.listen.port(), 3);
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.database_url(), "postgres://x");
        assert_eq!(
            c.admin_token_path(),
            PathBuf::from("/from/flag/admin-token")
        );
    }
}
