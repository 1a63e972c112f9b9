//! HTTP client for the control plane's agent API.

use std::time::Duration;

use gpufleet_proto::{
    paths, AgentEvent, EngineCert, EngineEnv, Heartbeat, HeartbeatAck, RegisterRequest,
    RegisterResponse,
};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::AgentError;

/// Why a call to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("control plane unreachable")]
    Unreachable(#[source] reqwest::Error),
    #[error("control plane rejected the credentials (401)")]
    Unauthorized,
    #[error("control plane answered {status}: {body}")]
    Rejected { status: StatusCode, body: String },
    #[error("control plane sent an unreadable answer")]
    BadResponse(#[source] reqwest::Error),
    #[error("control plane's answer is not of the expected shape")]
    Malformed,
}

#[derive(Clone)]
pub struct ControlPlane {
    http: reqwest::Client,
    base: String,
}

impl ControlPlane {
    /// A client of the control plane at `base_url`. With `pinned_pem`, the
    /// control plane's certificate is trusted alone (no system roots).
    pub fn new(base_url: &str, pinned_pem: Option<&str>) -> Result<Self, AgentError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10));
        if let Some(pem) = pinned_pem {
            let cert =
                reqwest::Certificate::from_pem(pem.as_bytes()).map_err(AgentError::HttpClient)?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(cert);
        }
        let http = builder.build().map_err(AgentError::HttpClient)?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_string(),
        })
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &B,
    ) -> Result<Option<R>, CallError> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(CallError::Unreachable)?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(CallError::Unauthorized);
        }
        if !status.is_success() {
            let mut body = resp.text().await.unwrap_or_default();
            body.truncate(300);
            return Err(CallError::Rejected { status, body });
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = resp.bytes().await.map_err(CallError::BadResponse)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&bytes).ok())
    }

    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, CallError> {
        self.post(paths::REGISTER, None, req)
            .await?
            .ok_or(CallError::Malformed)
    }

    /// Sends a heartbeat; `None` when the answer had no readable ack.
    pub async fn heartbeat(
        &self,
        token: &str,
        hb: &Heartbeat,
    ) -> Result<Option<HeartbeatAck>, CallError> {
        self.post(paths::HEARTBEAT, Some(token), hb).await
    }

    /// The engine's secret environment (e.g. `HF_TOKEN`).
    pub async fn engine_env(&self, token: &str) -> Result<EngineEnv, CallError> {
        self.post(paths::ENGINE_ENV, Some(token), &serde_json::json!({}))
            .await?
            .ok_or(CallError::Malformed)
    }

    /// Report the certificate the engine serves (before it starts).
    pub async fn engine_cert(&self, token: &str, cert: &EngineCert) -> Result<(), CallError> {
        self.post::<_, serde_json::Value>(paths::ENGINE_CERT, Some(token), cert)
            .await
            .map(|_| ())
    }

    pub async fn event(&self, token: &str, event: &AgentEvent) -> Result<(), CallError> {
        self.post::<_, serde_json::Value>(paths::EVENTS, Some(token), event)
            .await
            .map(|_| ())
    }
}

/// "a: b: c" from an error and its sources, for log fields.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
