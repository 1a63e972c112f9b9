//! Talking to the engine over HTTP: readiness and metrics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use gpufleet_domain::ModelName;

use crate::scrape::{self, EngineGauges};

#[derive(Clone)]
pub struct EngineProbe {
    http: reqwest::Client,
    base: String,
    model: ModelName,
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

impl EngineProbe {
    pub fn new(host: IpAddr, port: u16, model: ModelName) -> Self {
        // An engine listening on all addresses is reached on loopback.
        let host = match host {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            h => h,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        Self {
            http,
            base: format!("http://{}", SocketAddr::new(host, port)),
            model,
        }
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response, ProbeError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
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
