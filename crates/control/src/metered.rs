//! A [`Provider`] wrapper that times every call and counts failures by
//! error code, for `/metrics`. The wiring wraps each configured provider in
//! one, so every call site (reconcilers, catalog look-ups) is measured.

use crate::telemetry::{label, ProviderErrorLabels, ProviderOpLabels, Telemetry};
use async_trait::async_trait;
use gpufleet_domain::{ProviderInstanceId, ProviderName};
use gpufleet_providers::{
    Catalog, CreateRequest, Machine, Provider, ProviderError, ProviderRegistry, Resource,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// Provider operations, as labelled.
const OPS: [&str; 5] = ["create", "get", "terminate", "list", "catalog"];
/// [`ProviderError::code`]s known now (others appear when they happen).
const CODES: [&str; 5] = [
    "retryable",
    "permanent",
    "out_of_capacity",
    "not_found",
    "invalid_request",
];

pub struct MeteredProvider {
    inner: Arc<dyn Provider>,
    /// The provider's name, escaped for labels.
    label: String,
    telemetry: Arc<Telemetry>,
}

impl MeteredProvider {
    pub fn new(inner: Arc<dyn Provider>, telemetry: Arc<Telemetry>) -> Self {
        let label = label(inner.name().as_str());
        // Error counters start at zero, so `rate()` and dashboards see them
        // before the first failure.
        for op in OPS {
            for code in CODES {
                let _ = telemetry
                    .provider_call_errors
                    .get_or_create(&ProviderErrorLabels {
                        provider: label.clone(),
                        op,
                        code,
                    });
            }
        }
        Self {
            inner,
            label,
            telemetry,
        }
    }

    /// Every provider of `registry`, wrapped.
    pub fn wrap_all(registry: &ProviderRegistry, telemetry: &Arc<Telemetry>) -> ProviderRegistry {
        let mut out = ProviderRegistry::new();
        for (_, p) in registry.iter() {
            out.register(Arc::new(MeteredProvider::new(p.clone(), telemetry.clone())));
        }
        out
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let started = Instant::now();
        let result = call.await;
        self.telemetry
            .provider_call_duration
            .get_or_create(&ProviderOpLabels {
                provider: self.label.clone(),
                op,
            })
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.telemetry
                .provider_call_errors
                .get_or_create(&ProviderErrorLabels {
                    provider: self.label.clone(),
                    op,
                    code: e.code(),
                })
                .inc();
        }
        result
    }
}

#[async_trait]
impl Provider for MeteredProvider {
    fn name(&self) -> &ProviderName {
        self.inner.name()
    }
    async fn create(&self, req: &CreateRequest) -> Result<Machine, ProviderError> {
        self.timed("create", self.inner.create(req)).await
    }
    async fn get(&self, id: &ProviderInstanceId) -> Result<Machine, ProviderError> {
        self.timed("get", self.inner.get(id)).await
    }
    async fn terminate(&self, id: &ProviderInstanceId) -> Result<(), ProviderError> {
        self.timed("terminate", self.inner.terminate(id)).await
    }
    async fn list(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Machine>, ProviderError> {
        self.timed("list", self.inner.list(tags)).await
    }
    async fn catalog(&self) -> Result<Catalog, ProviderError> {
        self.timed("catalog", self.inner.catalog()).await
    }
    fn machines_on_this_host(&self) -> bool {
        self.inner.machines_on_this_host()
    }
    fn engine(&self) -> Option<gpufleet_proto::EngineSpec> {
        self.inner.engine()
    }
    async fn list_resources(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Resource>, ProviderError> {
        self.timed("list_resources", self.inner.list_resources(tags))
            .await
    }
    async fn delete_resource(&self, resource: &Resource) -> Result<(), ProviderError> {
        self.timed("delete_resource", self.inner.delete_resource(resource))
            .await
    }
}
