//! Talking to the engine over HTTP: readiness, metrics and the canary.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use gpufleet_domain::ModelName;

use crate::scrape::{self, EngineGauges};

/// Reads the engine: plain HTTP, or (once [`EngineProbe::use_tls`] was
/// called) https with the agent's client certificate, trusting the engine's
/// certificate alone. Clones share the switch.
#[derive(Clone)]
pub struct EngineProbe {
    target: Arc<RwLock<Target>>,
    addr: SocketAddr,
    model: ModelName,
}

struct Target {
    http: reqwest::Client,
    base: String,
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("engine unreachable")]
    Unreachable(#[source] reqwest::Error),
    #[error("engine answered {0}")]
    Status(reqwest::StatusCode),
    #[error("engine's /v1/models is unreadable")]
    BadModels(#[source] reqwest::Error),
    #[error("engine does not list model {0}")]
    ModelMissing(String),
}

/// Why the canary failed, readable on the instance's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryFailure {
    /// e.g. `no answer within 10 s`, `HTTP 500: ...`,
    /// `cannot connect to the engine: ...`.
    pub reason: String,
    /// Time to the answer, when one came.
    pub answered: Option<Duration>,
}

impl CanaryFailure {
    fn request(e: reqwest::Error, timeout: Duration) -> Self {
        let reason = if e.is_timeout() {
            format!("no answer within {}", human(timeout))
        } else if e.is_connect() {
            format!("cannot connect to the engine: {}", root_cause(&e))
        } else {
            format!("request failed: {}", root_cause(&e))
        };
        Self {
            reason,
            answered: None,
        }
    }
}

/// The innermost error (reqwest's own text says little: "error sending request").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// `10 s`, `500 ms`, `1.5 s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl EngineProbe {
    pub fn new(host: IpAddr, port: u16, model: ModelName) -> Self {
        // An engine listening on all addresses is reached on loopback.
        let host = match host {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            h => h,
        };
        let addr = SocketAddr::new(host, port);
        let http = builder().build().unwrap_or_default();
        Self {
            target: Arc::new(RwLock::new(Target {
                http,
                base: format!("http://{addr}"),
            })),
            addr,
            model,
        }
    }

    /// Speak https to the engine from now on: trust `engine_cert_pem` alone
    /// (for the name [`gpufleet_proto::ENGINE_TLS_SERVER_NAME`], at the
    /// engine's address) and present `identity_pem` (certificate + key).
    pub fn use_tls(&self, engine_cert_pem: &str, identity_pem: &str) -> Result<(), reqwest::Error> {
        let name = gpufleet_proto::ENGINE_TLS_SERVER_NAME;
        let http = builder()
            .add_root_certificate(reqwest::Certificate::from_pem(engine_cert_pem.as_bytes())?)
            .tls_built_in_root_certs(false)
            .identity(reqwest::Identity::from_pem(identity_pem.as_bytes())?)
            .resolve(name, self.addr)
            .build()?;
        let mut t = self.target.write().unwrap_or_else(|p| p.into_inner());
        *t = Target {
            http,
            base: format!("https://{name}:{}", self.addr.port()),
        };
        Ok(())
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response, ProbeError> {
        let (http, url) = {
            let t = self.target.read().unwrap_or_else(|p| p.into_inner());
            (t.http.clone(), format!("{}{path}", t.base))
        };
        let resp = http
            .get(url)
            .send()
            .await
            .map_err(ProbeError::Unreachable)?;
        if !resp.status().is_success() {
            return Err(ProbeError::Status(resp.status()));
        }
        Ok(resp)
    }

    /// Ok when `/health` is 200 and `/v1/models` lists the model.
    pub async fn serves_model(&self) -> Result<(), ProbeError> {
        self.get("/health").await?;
        let models: serde_json::Value = self
            .get("/v1/models")
            .await?
            .json()
            .await
            .map_err(ProbeError::BadModels)?;
        let listed = models["data"].as_array().is_some_and(|d| {
            d.iter()
                .any(|m| m["id"].as_str() == Some(self.model.as_str()))
        });
        if listed {
            Ok(())
        } else {
            Err(ProbeError::ModelMissing(self.model.to_string()))
        }
    }

    /// The engine canary: one real completion of one token, over the same
    /// client as the other probes (mutual TLS included), answered within
    /// `timeout`. Ok: the time to the answer. A hung engine can still
    /// answer `/health`; this cannot pass without the model running.
    pub async fn canary(&self, timeout: Duration) -> Result<Duration, CanaryFailure> {
        let (http, url) = {
            let t = self.target.read().unwrap_or_else(|p| p.into_inner());
            (t.http.clone(), format!("{}/v1/completions", t.base))
        };
        let body = serde_json::json!({
            "model": self.model.as_str(),
            "prompt": "ping",
            "max_tokens": 1,
            "temperature": 0,
        });
        let started = tokio::time::Instant::now();
        let call = async {
            let resp = http
                .post(url)
                .json(&body)
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| CanaryFailure::request(e, timeout))?;
            let status = resp.status();
            let answered = started.elapsed();
            let text = resp.text().await.map_err(|e| CanaryFailure {
                answered: Some(answered),
                ..CanaryFailure::request(e, timeout)
            })?;
            let fail = |reason: String| CanaryFailure {
                reason,
                answered: Some(answered),
            };
            if !status.is_success() {
                let excerpt: String = text.trim().chars().take(200).collect();
                return Err(fail(if excerpt.is_empty() {
                    format!("HTTP {}", status.as_u16())
                } else {
                    format!("HTTP {}: {excerpt}", status.as_u16())
                }));
            }
            let answer: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| fail(format!("the answer is not JSON: {e}")))?;
            match answer["choices"].as_array().map(Vec::len) {
                Some(n) if n > 0 => Ok(answered),
                Some(_) => Err(fail("the answer has no choice".into())),
                None => Err(fail("the answer is not a completion (no choices)".into())),
            }
        };
        // Belt and braces: the request's own timeout covers the body too.
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(CanaryFailure {
                reason: format!("no answer within {}", human(timeout)),
                answered: None,
            }),
        }
    }

    pub async fn gauges(&self) -> Result<EngineGauges, ProbeError> {
        let text = self
            .get("/metrics")
            .await?
            .text()
            .await
            .map_err(ProbeError::Unreachable)?;
        Ok(scrape::parse(&text))
    }
}
