//! The client commands: `instances` (with `instances metrics`), `deployments`, `providers`,
//! `models`, `top`, `api-keys`, `spend`. They speak the
//! public API with the same JSON types the server uses
//! ([`gpufleet_api::views`]).

pub mod accounts;
pub mod api_keys;
pub mod catalog;
pub mod deployments;
pub mod instances;
pub mod metrics;
pub mod render;
pub mod spend;
pub mod sse;
pub mod top;

use crate::config::{ADMIN_TOKEN_FILE, DEFAULT_DATA_DIR};
use anyhow::{anyhow, Context};
use gpufleet_api::views::ErrorBody;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::PathBuf;

/// Options every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// Base URL of the control plane.
    #[arg(
        long,
        global = true,
        env = "GPUFLEET_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Admin token or personal access token [default: $GPUFLEET_ADMIN_TOKEN,
    /// else the token `gpufleet login` saved for this server, else
    /// <data-dir>/admin-token].
    #[arg(
        long,
        global = true,
        env = "GPUFLEET_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Data directory of a local `gpufleet up`, where its admin token is
    /// [default: ./.gpufleet or $GPUFLEET_DATA_DIR].
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A client of one control plane.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    pub json: bool,
}

impl Client {
    /// Resolves the token (flag/env, else the one `login` saved for this
    /// server, else the data dir's admin token) and builds the client.
    pub fn new(opts: &ClientOpts) -> anyhow::Result<Client> {
        let server = opts.server.trim_end_matches('/');
        let given = opts.token.clone().filter(|t| !t.trim().is_empty());
        let token = match given {
            Some(t) => t.trim().to_string(),
            None => match accounts::saved_token(server)? {
                Some(t) => t,
                None => {
                    let dir = opts
                        .data_dir
                        .clone()
                        .or_else(|| std::env::var_os("GPUFLEET_DATA_DIR").map(PathBuf::from))
                        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
                    let path = dir.join(ADMIN_TOKEN_FILE);
                    crate::token::read(&path)?.ok_or_else(|| {
                    anyhow!(
                        "not logged in and no admin token\nhint: run `gpufleet login --email <you>`, set GPUFLEET_ADMIN_TOKEN or pass --token, or run where `gpufleet up` wrote {}",
                        path.display()
                    )
                })?
                }
            },
        };
        Self::with_token(opts, token)
    }

    /// A client that has no token yet (`gpufleet login`, `logout`).
    pub fn without_token(opts: &ClientOpts) -> anyhow::Result<Client> {
        Self::with_token(opts, String::new())
    }

    fn with_token(opts: &ClientOpts, token: String) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            base: opts.server.trim_end_matches('/').to_string(),
            token,
            http,
            json: opts.json,
        })
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request without credentials.
    pub fn raw(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request with the admin token.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends `req`; on success returns the body as JSON.
    pub async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let resp = req.send().await.map_err(|e| self.transport_error(e))?;
        self.answer(resp).await
    }

    /// A response's body as JSON, or the error [`Client::check`] makes of a
    /// non-2xx answer.
    pub async fn answer<T: DeserializeOwned>(&self, resp: reqwest::Response) -> anyhow::Result<T> {
        let resp = self.check(resp).await?;
        let text = resp.text().await.map_err(|e| self.transport_error(e))?;
        serde_json::from_str(&text)
            .with_context(|| format!("unexpected answer from {}: {text}", self.base))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    /// Turns a non-2xx answer into an error carrying the API's message and a hint.
    pub async fn check(&self, resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => format!("{} ({})", body.error.message, body.error.code),
            Err(_) if text.trim().is_empty() => status.to_string(),
            Err(_) => text.trim().to_string(),
        };
        let hint = match status {
            StatusCode::UNAUTHORIZED => Some(
                "the server rejected the token; log in again with `gpufleet login`, or use the admin token \
                 of the `gpufleet up` at this URL (GPUFLEET_ADMIN_TOKEN, --token, or its <data-dir>/admin-token)"
                    .to_string(),
            ),
            StatusCode::FORBIDDEN => Some(
                "your role does not allow this; `gpufleet whoami` shows your roles, a project admin can grant another"
                    .to_string(),
            ),
            StatusCode::NOT_FOUND if message.contains("deployment") => {
                Some("list deployments with `gpufleet deployments list --all`".to_string())
            }
            StatusCode::NOT_FOUND if message.contains("instance") => {
                Some("list instances with `gpufleet instances list --all`".to_string())
            }
            StatusCode::CONFLICT if message.contains("deployment") => Some(
                "check it with `gpufleet deployments list --all`; a name is free again once its deployment is deleted"
                    .to_string(),
            ),
            StatusCode::CONFLICT => Some("check the instance's status with `gpufleet instances get <id>`".to_string()),
            StatusCode::BAD_REQUEST if message.contains("placements[") => Some(
                "see the types and zones with `gpufleet providers types <provider>` and the models with `gpufleet models`"
                    .to_string(),
            ),
            _ => None,
        };
        Err(match hint {
            Some(h) => anyhow!("{status}: {message}\nhint: {h}"),
            None => anyhow!("{status}: {message}"),
        })
    }

    pub fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        if e.is_connect() {
            anyhow!(
                "cannot connect to {}: {}\nhint: is `gpufleet up` running at {}? (set --server or GPUFLEET_SERVER)",
                self.base,
                root_cause(&e),
                self.base
            )
        } else if e.is_timeout() {
            anyhow!("{} did not answer in time: {}", self.base, root_cause(&e))
        } else {
            anyhow!("request to {} failed: {}", self.base, root_cause(&e))
        }
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Prints `value` as pretty JSON.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
