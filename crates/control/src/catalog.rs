//! What can be asked for: the configured providers (each wrapped in a
//! [`crate::metered::MeteredProvider`] by [`crate::wiring`]), their catalogs,
//! and the models the fleet serves.

use crate::config::ModelSpec;
use crate::error::ControlError;
use gpufleet_domain::{ModelName, ProviderName};
use gpufleet_providers::{Catalog, Provider, ProviderRegistry};
use std::sync::Arc;

/// The providers and the model list. Cheap to clone.
#[derive(Clone)]
pub struct Catalogs {
    providers: ProviderRegistry,
    models: Arc<[ModelSpec]>,
}

impl Catalogs {
    pub fn new(providers: ProviderRegistry, models: Vec<ModelSpec>) -> Self {
        Self {
            providers,
            models: models.into(),
        }
    }

    /// The configured providers.
    pub fn providers(&self) -> &ProviderRegistry {
        &self.providers
    }

    pub fn provider(&self, name: &ProviderName) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }

    pub fn provider_names(&self) -> Vec<ProviderName> {
        self.providers.names().cloned().collect()
    }

    /// A provider's catalog. `NotFound` for an unknown provider name.
    pub async fn catalog(&self, provider: &str) -> Result<Catalog, ControlError> {
        let p = provider
            .parse::<ProviderName>()
            .ok()
            .and_then(|n| self.provider(&n).cloned())
            .ok_or_else(|| ControlError::not_found("provider", provider))?;
        p.catalog()
            .await
            .map_err(|source| ControlError::ProviderUnavailable {
                provider: provider.to_string(),
                source,
            })
    }

    /// Whether `provider`'s machines run on another host (their engines are
    /// reached over mutual TLS). Unknown providers count as remote.
    pub fn provider_is_remote(&self, provider: &ProviderName) -> bool {
        self.provider(provider)
            .is_none_or(|p| !p.machines_on_this_host())
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.models
    }

    /// The memory a model's weights need, in MiB (0: unknown).
    pub fn model_size_mib(&self, model: &ModelName) -> u64 {
        self.models
            .iter()
            .find(|m| m.name == *model)
            .map_or(0, |m| m.min_vram_mib)
    }
}
