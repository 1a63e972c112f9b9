//! The HTTP side: one client with the `X-Auth-Token` header, a timeout on
//! every call, bounded concurrency, a call counter, Scaleway's error bodies
//! mapped to [`ProviderError`], and the wire types gpufleet reads.

use super::config::SecretKey;
use crate::ProviderError;
use gpufleet_domain::ProviderInstanceId;
use reqwest::header::{HeaderMap, CONTENT_TYPE, LINK, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::error;

/// API calls made, in all and per provider operation (`create`, `get`,
/// `terminate`, `list`, `catalog`, `list_resources`, `delete_resource`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiCalls {
    pub total: u64,
    pub by_operation: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Default)]
pub(crate) struct CallCounter {
    total: AtomicU64,
    by_op: Mutex<BTreeMap<&'static str, u64>>,
}

impl CallCounter {
    fn count(&self, op: &'static str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        *self
            .by_op
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(op)
            .or_default() += 1;
    }
    pub(crate) fn snapshot(&self) -> ApiCalls {
        ApiCalls {
            total: self.total.load(Ordering::Relaxed),
            by_operation: self
                .by_op
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// A request body.
pub(crate) enum Body {
    None,
    Json(serde_json::Value),
    Text(String),
}

/// A successful answer.
pub(crate) struct Answer {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self, what: &str) -> Result<T, ProviderError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ProviderError::retryable(format!(
                "Scaleway answered {what} with a body gpufleet cannot read: {e}"
            ))
        })
    }
    pub fn total_count(&self) -> Option<u64> {
        self.headers
            .get("x-total-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    }
    /// The `page` of the `rel="next"` link, if there is one. The API's links
    /// are relative to the product's root (`</products/servers?page=2&per_page=50&>`),
    /// so only their page number is used.
    pub fn next_page(&self) -> Option<u32> {
        let link = self.headers.get(LINK)?.to_str().ok()?;
        next_page_of(link)
    }
}

pub(crate) fn next_page_of(link: &str) -> Option<u32> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        if !params.split(';').any(|p| {
            let p = p.trim();
            p == "rel=\"next\"" || p == "rel=next"
        }) {
            return None;
        }
        let url = url.trim().trim_start_matches('<').trim_end_matches('>');
        let query = url.split_once('?')?.1;
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix("page="))
            .and_then(|p| p.parse().ok())
    })
}

pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token: SecretKey,
    permits: Semaphore,
    pub(crate) calls: CallCounter,
    auth_logged: AtomicBool,
    /// No call is sent before this instant: the API answered 429 with a
    /// `Retry-After` (every call waits, not only the one that was refused).
    throttled_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// How long one call may keep waiting out 429s before it gives up (as a
/// `Retryable` error, which the provisioner retries later).
const RATE_LIMIT_BUDGET: Duration = Duration::from_secs(30);
/// The wait after a 429 without `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

impl Api {
    pub fn new(
        base: &str,
        token: SecretKey,
        timeout: Duration,
        max_concurrent: usize,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("gpufleet/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
            permits: Semaphore::new(max_concurrent),
            calls: CallCounter::default(),
            auth_logged: AtomicBool::new(false),
            throttled_until: std::sync::Mutex::new(None),
        }))
    }

    /// One call. `op` is the provider operation it is counted under; a
    /// non-2xx answer is mapped by [`map_error`]. A 429 is waited out (its
    /// `Retry-After`, shared by every call) and the call sent again, for up to
    /// [`RATE_LIMIT_BUDGET`]: Scaleway does not publish its limits, so the
    /// client follows what the API says.
    pub async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Body,
    ) -> Result<Answer, ProviderError> {
        let started = tokio::time::Instant::now();
        loop {
            self.wait_out_throttle().await;
            match self.send(op, &method, path, query, &body).await {
                Err((e, StatusCode::TOO_MANY_REQUESTS)) => {
                    let wait = e.retry_after().unwrap_or(DEFAULT_RETRY_AFTER);
                    let until = tokio::time::Instant::now() + wait;
                    {
                        let mut t = self
                            .throttled_until
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if t.is_none_or(|cur| cur < until) {
                            *t = Some(until);
                        }
                    }
                    if until.duration_since(started) > RATE_LIMIT_BUDGET {
                        return Err(e);
                    }
                }
                Err((e, _)) => return Err(e),
                Ok(answer) => return Ok(answer),
            }
        }
    }

    async fn wait_out_throttle(&self) {
        let until = *self
            .throttled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    async fn send(
        &self,
        op: &'static str,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        body: &Body,
    ) -> Result<Answer, (ProviderError, StatusCode)> {
        // The status of a failure without an answer.
        const NONE: StatusCode = StatusCode::BAD_GATEWAY;
        let _permit = self.permits.acquire().await.map_err(|_| {
            (
                ProviderError::retryable("the Scaleway client is shutting down"),
                NONE,
            )
        })?;
        self.calls.count(op);
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("X-Auth-Token", self.token.expose());
        if !query.is_empty() {
            req = req.query(query);
        }
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(v),
            Body::Text(t) => req.header(CONTENT_TYPE, "text/plain").body(t.clone()),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| (transport_error(method, path, e), NONE))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| (transport_error(method, path, e), NONE))?
            .to_vec();
        if status.is_success() {
            return Ok(Answer { headers, body });
        }
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let err = map_error(status.as_u16(), retry_after, &body);
        if matches!(status.as_u16(), 401 | 403) && !self.auth_logged.swap(true, Ordering::Relaxed) {
            // Once per provider: every retry would say the same.
            error!(provider = "scaleway", status = status.as_u16(), "{err}");
        }
        Err((err, status))
    }
}

fn transport_error(method: &Method, path: &str, e: reqwest::Error) -> ProviderError {
    // reqwest's Display carries the URL (no credentials: the token is a header).
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    ProviderError::retryable(format!(
        "Scaleway {method} {path} {kind}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string())
    ))
}

/// Scaleway's error body (standard errors and the Instance API's older ones).
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    resource_id: Option<String>,
    #[serde(default)]
    details: Option<serde_json::Value>,
    #[serde(default)]
    fields: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    help_message: Option<String>,
}

/// Maps a failed answer. `retry_after`: the `Retry-After` header, seconds.
pub fn map_error(status: u16, retry_after: Option<u64>, body: &[u8]) -> ProviderError {
    let b: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let what = if b.message.is_empty() {
        String::from_utf8_lossy(body)
            .chars()
            .take(200)
            .collect::<String>()
    } else {
        b.message.clone()
    };
    let lower = b.message.to_ascii_lowercase();
    if status == 429 || b.kind == "too_many_requests" {
        let msg = format!("Scaleway rate limit (HTTP {status}): {what}");
        return ProviderError::retryable_after(msg, retry_after);
    }
    if status >= 500 {
        return ProviderError::retryable_after(
            format!("Scaleway server error (HTTP {status}): {what}"),
            retry_after,
        );
    }
    match b.kind.as_str() {
        "quotas_exceeded" => {
            return ProviderError::Permanent {
                message: format!("Scaleway quota exceeded: {}", quota_names(&b)),
            }
        }
        "invalid_request_error" if lower.contains("quota exceeded") => {
            return ProviderError::Permanent {
                message: format!(
                    "Scaleway quota exceeded: {}",
                    b.resource.clone().unwrap_or_else(|| what.clone())
                ),
            }
        }
        "out_of_stock" => {
            return ProviderError::OutOfCapacity {
                message: format!("Scaleway is out of stock: {what}"),
            }
        }
        "denied_authentication" | "permissions_denied" | "authentication_error" => {
            return auth_error(status, &what)
        }
        "invalid_arguments" => {
            let (field, message) = invalid_argument(&b);
            return ProviderError::InvalidRequest { field, message };
        }
        "invalid_request_error" if b.fields.as_ref().is_some_and(|f| !f.is_empty()) => {
            let (name, msgs) = b
                .fields
                .as_ref()
                .and_then(|f| f.iter().next())
                .expect("non-empty");
            return ProviderError::InvalidRequest {
                field: static_field(name),
                message: format!("{name}: {}", msgs.join("; ")),
            };
        }
        "not_found" | "unknown_resource" => {
            return ProviderError::NotFound {
                id: ProviderInstanceId::new(b.resource_id.clone().unwrap_or_default()),
            }
        }
        "precondition_failed"
        | "transient_state"
        | "resource_locked"
        | "already_exists"
        | "conflict" => {
            return ProviderError::retryable_after(
                format!("Scaleway refused for now ({}): {what}", b.kind),
                retry_after,
            )
        }
        _ => {}
    }
    match status {
        401 | 403 => auth_error(status, &what),
        404 => ProviderError::NotFound {
            id: ProviderInstanceId::new(b.resource_id.clone().unwrap_or_default()),
        },
        409 | 412 | 423 => {
            ProviderError::retryable(format!("Scaleway refused for now (HTTP {status}): {what}"))
        }
        _ => ProviderError::Permanent {
            message: format!(
                "Scaleway refused the request (HTTP {status}{}): {what}{}",
                if b.kind.is_empty() {
                    String::new()
                } else {
                    format!(", {}", b.kind)
                },
                b.help_message
                    .as_deref()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default()
            ),
        },
    }
}

fn auth_error(status: u16, what: &str) -> ProviderError {
    ProviderError::Permanent {
        message: format!(
            "Scaleway rejected the credentials (SCW_ACCESS_KEY/SCW_SECRET_KEY) or their permissions \
             (HTTP {status}): {what}; check the API key and that its IAM policy grants \
             InstancesFullAccess, BlockStorageFullAccess and MarketplaceReadOnly on the project"
        ),
    }
}

fn quota_names(b: &ErrorBody) -> String {
    let list: Vec<String> = b
        .details
        .as_ref()
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|d| {
                    let resource = d.get("resource")?.as_str()?;
                    let quota = d.get("quota").and_then(|q| q.as_u64());
                    let current = d.get("current").and_then(|q| q.as_u64());
                    Some(match (quota, current) {
                        (Some(q), Some(c)) => format!("{resource} (quota {q}, in use {c})"),
                        _ => resource.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        b.message.clone()
    } else {
        list.join(", ")
    }
}

fn invalid_argument(b: &ErrorBody) -> (&'static str, String) {
    let first = b
        .details
        .as_ref()
        .and_then(|d| d.as_array())
        .and_then(|a| a.first());
    match first {
        Some(d) => {
            let name = d
                .get("argument_name")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let help = d
                .get("help_message")
                .and_then(|v| v.as_str())
                .or_else(|| d.get("reason").and_then(|v| v.as_str()))
                .unwrap_or(&b.message);
            (static_field(name), format!("{name}: {help}"))
        }
        None => ("request", b.message.clone()),
    }
}

/// The request field a Scaleway argument name stands for.
fn static_field(name: &str) -> &'static str {
    match name {
        "commercial_type" => "instance_type",
        "zone" => "zone",
        "image" => "image",
        "tags" => "tags",
        "name" => "name",
        "project" | "project_id" => "project",
        "volumes" | "size" | "from_empty" => "volume",
        "public_ips" | "reverse" | "type" => "ip",
        "security_group" => "security_group",
        _ => "request",
    }
}

// ---------------------------------------------------------------- wire types

#[derive(Debug, Clone, Deserialize)]
pub struct ServerEnvelope {
    pub server: Server,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServersPage {
    #[serde(default)]
    pub servers: Vec<Server>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Server {
    pub id: String,
    #[serde(default)]
    pub commercial_type: String,
    pub state: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub creation_date: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    pub public_ip: Option<ServerIp>,
    #[serde(default)]
    pub public_ips: Vec<ServerIp>,
    #[serde(default)]
    pub volumes: BTreeMap<String, ServerVolume>,
    #[serde(default)]
    pub allowed_actions: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerIp {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerVolume {
    pub id: String,
    #[serde(default)]
    pub volume_type: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UserDataKeys {
    #[serde(default)]
    pub user_data: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IpsPage {
    #[serde(default)]
    pub ips: Vec<Ip>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Ip {
    pub id: String,
    #[serde(default)]
    pub server: Option<IdRef>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IdRef {
    pub id: String,
}

/// A page of a listing whose items carry tags.
pub(crate) trait TaggedPage: DeserializeOwned {
    type Item;
    fn len(&self) -> usize;
    fn items(self) -> Vec<Self::Item>;
    fn tags(item: &Self::Item) -> &[String];
}

impl TaggedPage for ServersPage {
    type Item = Server;
    fn len(&self) -> usize {
        self.servers.len()
    }
    fn items(self) -> Vec<Server> {
        self.servers
    }
    fn tags(item: &Server) -> &[String] {
        &item.tags
    }
}

impl TaggedPage for IpsPage {
    type Item = Ip;
    fn len(&self) -> usize {
        self.ips.len()
    }
    fn items(self) -> Vec<Ip> {
        self.ips
    }
    fn tags(item: &Ip) -> &[String] {
        &item.tags
    }
}

impl TaggedPage for VolumesPage {
    type Item = Volume;
    fn len(&self) -> usize {
        self.volumes.len()
    }
    fn items(self) -> Vec<Volume> {
        self.volumes
    }
    fn tags(item: &Volume) -> &[String] {
        &item.tags
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct VolumesPage {
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Volume {
    pub id: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub references: Vec<VolumeReference>,
    #[serde(default)]
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VolumeReference {
    #[serde(default)]
    pub product_resource_type: String,
    #[serde(default)]
    pub product_resource_id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LocalImages {
    #[serde(default)]
    pub local_images: Vec<LocalImage>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LocalImage {
    pub id: String,
    #[serde(default)]
    pub compatible_commercial_types: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecurityGroupsPage {
    #[serde(default)]
    pub security_groups: Vec<SecurityGroup>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecurityGroupEnvelope {
    pub security_group: SecurityGroup,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecurityGroup {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RulesPage {
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub direction: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub dest_port_from: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProductsPage {
    #[serde(default)]
    pub servers: BTreeMap<String, Product>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Product {
    #[serde(default)]
    pub ncpus: u32,
    #[serde(default)]
    pub ram: u64,
    #[serde(default)]
    pub gpu: u32,
    #[serde(default)]
    pub gpu_info: Option<GpuInfo>,
    #[serde(default)]
    pub hourly_price: f64,
    #[serde(default)]
    pub end_of_service: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GpuInfo {
    #[serde(default)]
    pub gpu_name: String,
    #[serde(default)]
    pub gpu_memory: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AvailabilityPage {
    #[serde(default)]
    pub servers: BTreeMap<String, Availability>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Availability {
    #[serde(default)]
    pub availability: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_page_from_recorded_links() {
        assert_eq!(
            next_page_of(
                r#"</products/servers?page=2&per_page=50&>; rel="next",</products/servers?page=3&per_page=50&>; rel="last""#
            ),
            Some(2)
        );
        assert_eq!(
            next_page_of(
                r#"</products/servers?page=1&per_page=50&>; rel="first",</products/servers?page=1&per_page=50&>; rel="previous",</products/servers?page=3&per_page=50&>; rel="next",</products/servers?page=3&per_page=50&>; rel="last""#
            ),
            Some(3)
        );
        assert_eq!(
            next_page_of(
                r#"</products/servers?page=1&per_page=50&>; rel="first",</products/servers?page=2&per_page=50&>; rel="previous",</products/servers?page=3&per_page=50&>; rel="last""#
            ),
            None
        );
    }

    #[test]
    fn every_error_type_maps() {
        let e = map_error(
            429,
            Some(7),
            br#"{"type":"too_many_requests","message":"rate limit exceeded"}"#,
        );
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(map_error(503, None, b"<html>bad gateway</html>").is_retryable());
        let e = map_error(
            403,
            None,
            br#"{"type":"quotas_exceeded","message":"quota(s) exceeded for this resource","details":[{"resource":"gpu_l4_instances","quota":1,"current":1}]}"#,
        );
        assert_eq!(e.code(), "permanent");
        assert!(
            e.to_string()
                .contains("gpu_l4_instances (quota 1, in use 1)"),
            "{e}"
        );
        let e = map_error(
            400,
            None,
            br#"{"type":"invalid_request_error","message":"Quota exceeded for this resource.","resource":"compute_instances"}"#,
        );
        assert!(e.to_string().contains("compute_instances"), "{e}");
        assert_eq!(e.code(), "permanent");
        let e = map_error(
            412,
            None,
            br#"{"type":"out_of_stock","message":"out of stock","resource":"L40S-1-48G"}"#,
        );
        assert_eq!(e.code(), "out_of_capacity");
        for body in [
            &br#"{"type":"denied_authentication","message":"invalid authentication","method":"api_key","reason":"invalid_argument"}"#[..],
            &br#"{"type":"permissions_denied","message":"insufficient permissions","details":[{"resource":"instance_server","action":"create"}]}"#[..],
        ] {
            let e = map_error(if body.starts_with(b"{\"type\":\"d") { 401 } else { 403 }, None, body);
            assert_eq!(e.code(), "permanent");
            assert!(e.to_string().contains("SCW_ACCESS_KEY/SCW_SECRET_KEY"), "{e}");
        }
        let recorded = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/scaleway/error_invalid_arguments.json"
        ))
        .unwrap();
        match map_error(400, None, &recorded) {
            ProviderError::InvalidRequest { field, message } => {
                assert_eq!(field, "ip");
                assert!(
                    message.starts_with("reverse: Your reverse must resolve"),
                    "{message}"
                );
            }
            e => panic!("{e:?}"),
        }
        let e = map_error(
            400,
            None,
            br#"{"type":"invalid_request_error","message":"Validation Error","fields":{"commercial_type":["not a valid type"]}}"#,
        );
        assert!(
            matches!(
                e,
                ProviderError::InvalidRequest {
                    field: "instance_type",
                    ..
                }
            ),
            "{e:?}"
        );
        let not_found = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/scaleway/server_not_found.json"
        ))
        .unwrap();
        assert!(matches!(
            map_error(404, None, &not_found),
            ProviderError::NotFound { .. }
        ));
        assert!(
            map_error(409, None, br#"{"type":"transient_state","message":"busy"}"#).is_retryable()
        );
        assert_eq!(map_error(400, None, b"{}").code(), "permanent");
    }
}
