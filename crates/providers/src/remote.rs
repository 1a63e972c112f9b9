//! A provider served by another process over HTTP: [`RemoteProvider`] is
//! the client, [`wire`] the JSON both sides speak. `gpufleet mock-provider`
//! serves the Mock provider this way, so that several control-plane
//! replicas share one set of Mock machines (the Mock provider itself keeps
//! its machines in one data directory that one process may open).
//!
//! Routes (all JSON):
//! - `GET  /provider/v1/info` → [`wire::Info`]
//! - `GET  /provider/v1/catalog` → [`Catalog`]
//! - `POST /provider/v1/machines` ([`CreateRequest`]) → [`Machine`]
//! - `GET  /provider/v1/machines/{id}` → [`Machine`]
//! - `DELETE /provider/v1/machines/{id}` → 204
//! - `POST /provider/v1/machines/search` ([`wire::Search`]) → `[Machine]`
//! - `POST /provider/v1/resources/search` ([`wire::Search`]) → `[Resource]`
//! - `POST /provider/v1/resources/delete` ([`Resource`]) → 204
//!
//! Errors are 4xx/5xx with a [`wire::WireError`] body, mapped back to the
//! same [`ProviderError`]. A connection failure or timeout is `Retryable`.

use crate::{Catalog, CreateRequest, Machine, Provider, ProviderError, Resource};
use async_trait::async_trait;
use gpufleet_domain::{ProviderInstanceId, ProviderName};
use gpufleet_proto::EngineSpec;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::time::Duration;

/// The JSON the provider service and its clients exchange.
pub mod wire {
    use crate::ProviderError;
    use gpufleet_domain::ProviderInstanceId;
    use gpufleet_proto::EngineSpec;
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    /// What the service serves.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Info {
        pub name: String,
        pub machines_on_this_host: bool,
        pub engine: Option<EngineSpec>,
    }

    /// Tags to filter by.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Search {
        pub tags: BTreeMap<String, String>,
    }

    /// A [`ProviderError`] on the wire.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct WireError {
        /// [`ProviderError::code`].
        pub code: String,
        pub message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub retry_after_secs: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub field: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub machine_id: Option<ProviderInstanceId>,
    }

    impl WireError {
        /// The HTTP status the service answers this error with.
        pub fn status(e: &ProviderError) -> u16 {
            match e {
                ProviderError::Retryable { .. } => 503,
                ProviderError::Permanent { .. } => 422,
                ProviderError::OutOfCapacity { .. } => 409,
                ProviderError::NotFound { .. } => 404,
                ProviderError::InvalidRequest { .. } => 400,
            }
        }
    }

    impl From<&ProviderError> for WireError {
        fn from(e: &ProviderError) -> Self {
            let (message, retry_after_secs, field, machine_id) = match e {
                ProviderError::Retryable {
                    message,
                    retry_after_secs,
                } => (message.clone(), *retry_after_secs, None, None),
                ProviderError::Permanent { message } | ProviderError::OutOfCapacity { message } => {
                    (message.clone(), None, None, None)
                }
                ProviderError::NotFound { id } => (e.to_string(), None, None, Some(id.clone())),
                ProviderError::InvalidRequest { field, message } => {
                    (message.clone(), None, Some(field.to_string()), None)
                }
            };
            WireError {
                code: e.code().to_string(),
                message,
                retry_after_secs,
                field,
                machine_id,
            }
        }
    }

    impl WireError {
        /// Back to the provider's error. `InvalidRequest` keeps its field
        /// when it is one the provider API knows, else it reads as
        /// `Permanent` naming the field.
        pub fn into_error(self) -> ProviderError {
            match self.code.as_str() {
                "retryable" => ProviderError::retryable_after(self.message, self.retry_after_secs),
                "out_of_capacity" => ProviderError::OutOfCapacity {
                    message: self.message,
                },
                "not_found" => match self.machine_id {
                    Some(id) => ProviderError::NotFound { id },
                    None => ProviderError::Permanent {
                        message: self.message,
                    },
                },
                "invalid_request" => {
                    let field = self.field.unwrap_or_default();
                    match KNOWN_FIELDS.iter().find(|f| **f == field) {
                        Some(f) => ProviderError::InvalidRequest {
                            field: f,
                            message: self.message,
                        },
                        None => ProviderError::Permanent {
                            message: format!("invalid {field}: {}", self.message),
                        },
                    }
                }
                _ => ProviderError::Permanent {
                    message: self.message,
                },
            }
        }
    }

    /// Fields a provider's `InvalidRequest` names.
    const KNOWN_FIELDS: &[&str] = &["zone", "instance_type", "tags", "idempotency_key", "id"];
}

/// A provider behind `base_url` (e.g. `http://127.0.0.1:7600`).
pub struct RemoteProvider {
    name: ProviderName,
    base: String,
    http: reqwest::Client,
    machines_on_this_host: bool,
    engine: Option<EngineSpec>,
}

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl RemoteProvider {
    /// Ask the service what it serves; fails if it cannot be reached.
    pub async fn connect(base_url: &str) -> Result<RemoteProvider, ProviderError> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| ProviderError::Permanent {
                message: format!("HTTP client: {e}"),
            })?;
        let base = base_url.trim_end_matches('/').to_string();
        let mut p = RemoteProvider {
            name: "mock".parse().expect("a valid provider name"),
            base,
            http,
            machines_on_this_host: false,
            engine: None,
        };
        let info: wire::Info = p.call(p.http.get(p.url("info"))).await?;
        p.name = info.name.parse().map_err(|_| ProviderError::Permanent {
            message: format!("the provider service names itself {:?}", info.name),
        })?;
        p.machines_on_this_host = info.machines_on_this_host;
        p.engine = info.engine;
        Ok(p)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/provider/v1/{path}", self.base)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ProviderError> {
        let resp = self.send(req).await?;
        resp.json::<T>()
            .await
            .map_err(|e| ProviderError::retryable(format!("provider service answer: {e}")))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ProviderError> {
        let resp = req.send().await.map_err(|e| {
            ProviderError::retryable(format!("provider service at {}: {e}", self.base))
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        match resp.json::<wire::WireError>().await {
            Ok(w) => Err(w.into_error()),
            Err(_) => Err(ProviderError::retryable(format!(
                "provider service answered {status}"
            ))),
        }
    }
}

#[async_trait]
impl Provider for RemoteProvider {
    fn name(&self) -> &ProviderName {
        &self.name
    }

    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        self.call(self.http.post(self.url("machines")).json(req))
            .await
    }

    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        self.call(
            self.http
                .get(self.url(&format!("machines/{}", id.as_str()))),
        )
        .await
    }

    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        self.send(
            self.http
                .delete(self.url(&format!("machines/{}", id.as_str()))),
        )
        .await
        .map(|_| ())
    }

    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError> {
        let body = wire::Search { tags: tags.clone() };
        self.call(self.http.post(self.url("machines/search")).json(&body))
            .await
    }

    async fn catalog(&self) -> Result<Catalog, ProviderError> {
        self.call(self.http.get(self.url("catalog"))).await
    }

    fn machines_on_this_host(&self) -> bool {
        self.machines_on_this_host
    }

    fn engine(&self) -> Option<EngineSpec> {
        self.engine.clone()
    }

    async fn list_resources(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Resource>, ProviderError> {
        let body = wire::Search { tags: tags.clone() };
        self.call(self.http.post(self.url("resources/search")).json(&body))
            .await
    }

    async fn delete_resource(&self, resource: &Resource) -> Result<(), ProviderError> {
        self.send(self.http.post(self.url("resources/delete")).json(resource))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::wire::WireError;
    use crate::ProviderError;

    #[test]
    fn errors_survive_the_wire() {
        let cases = vec![
            ProviderError::retryable_after("slow down", Some(7)),
            ProviderError::retryable("flaky"),
            ProviderError::Permanent {
                message: "no".into(),
            },
            ProviderError::OutOfCapacity {
                message: "none left".into(),
            },
            ProviderError::NotFound {
                id: gpufleet_domain::ProviderInstanceId::new("m-1"),
            },
            ProviderError::InvalidRequest {
                field: "zone",
                message: "unknown zone".into(),
            },
        ];
        for e in cases {
            let w = WireError::from(&e);
            let json = serde_json::to_string(&w).unwrap();
            let back: WireError = serde_json::from_str(&json).unwrap();
            assert_eq!(back.into_error(), e);
        }
    }
}
