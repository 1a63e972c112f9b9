//! What the fleet's machines cost: per instance from its billable interval
//! (`billing_started_at`..`billing_ended_at`, stamped by
//! [`crate::lifecycle`]) and the price per hour it was created at, rolled up
//! per project, deployment, model or provider, with the tokens the router
//! counted (`usage_hourly`) for the cost per million tokens. The arithmetic
//! is [`gpufleet_domain::spend`]'s; this reads the store.
//!
//! Tokens are counted per whole UTC hour (that is how the router stores
//! them): a report over `[from, to)` counts the tokens of the hours starting
//! in `[hour of from, to)`, so a `from` in the middle of an hour counts that
//! whole hour's tokens while its cost counts from `from`.

use crate::catalog::Catalogs;
use crate::error::ControlError;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use gpufleet_domain::spend::{self, Billable, Buckets, GroupBy, SpendError, SpendStep};
use gpufleet_domain::{InstanceId, ModelName, ProjectId, ProviderName};
use gpufleet_store::{HourlyUsage, InstanceRecord, Store};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The key of the group of instances (and usage) without a deployment.
pub const NO_DEPLOYMENT: &str = "none";
/// The key of usage whose instance is no longer known (provider grouping).
pub const UNKNOWN: &str = "unknown";
/// How long a report waits for a provider's catalog (for GPU counts).
const CATALOG_TIMEOUT: Duration = Duration::from_secs(2);

/// Spend reports. Cheap to clone.
#[derive(Clone)]
pub struct Spend {
    store: Store,
    /// Where GPU counts per instance type come from (`None`: unknown).
    catalogs: Option<Catalogs>,
}

/// Cost, hours and tokens of a group (or of the whole report).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpendFigures {
    pub cost: f64,
    /// Hours the instances were billable.
    pub instance_hours: f64,
    /// Instance hours × the GPUs of each instance's type, for the types
    /// whose GPU count the catalog gives (see
    /// [`SpendReport::gpu_count_unknown_instances`]).
    pub gpu_hours: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl SpendFigures {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// `cost / tokens × 1e6`; `None` without tokens.
    pub fn cost_per_million_tokens(&self) -> Option<f64> {
        spend::cost_per_million_tokens(self.cost, self.tokens())
    }
}

/// One group of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendGroup {
    /// The project id, deployment id ([`NO_DEPLOYMENT`] for instances of
    /// none), model name or provider name.
    pub key: String,
    pub figures: SpendFigures,
    /// Cost per bucket, aligned on [`SpendReport::timestamps`].
    pub cost_series: Vec<f64>,
}

/// `GET /api/v1/spend`'s figures.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub step: SpendStep,
    pub group_by: GroupBy,
    /// Each bucket's start (UTC-aligned; the first may precede `from`).
    pub timestamps: Vec<DateTime<Utc>>,
    pub total: SpendFigures,
    /// Most expensive first (then by key).
    pub groups: Vec<SpendGroup>,
    /// Billable instances in the range with no price (created before
    /// prices were kept): they cost 0 here.
    pub unpriced_instances: u32,
    /// Billable instances whose type's GPU count is unknown (no longer in
    /// the catalog, or the catalog did not answer): not in `gpu_hours`.
    pub gpu_count_unknown_instances: u32,
}

/// What `/metrics` exports about spend.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpendGauges {
    /// Instances billable now with a price: (record, price per hour).
    pub billable_now: Vec<(InstanceRecord, f64)>,
    /// Cost since the start of the UTC month, per project.
    pub month_to_date: BTreeMap<ProjectId, f64>,
    /// Cost per million tokens over the trailing 24 h, per model with tokens.
    pub model_cost_per_million_tokens: BTreeMap<ModelName, f64>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn billable(r: &InstanceRecord) -> Option<Billable> {
    Some(Billable {
        start: ms(r.billing_started_at?),
        end: r.billing_ended_at.map(ms),
        price_per_hour: r.price_per_hour,
    })
}

fn invalid(e: SpendError) -> ControlError {
    ControlError::invalid(e.field(), e.to_string())
}

/// The start of the UTC month `now` is in.
pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now)
}

impl Spend {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            catalogs: None,
        }
    }

    /// Count GPU hours with the GPU counts of `catalogs`' instance types.
    pub fn with_catalogs(mut self, catalogs: Catalogs) -> Self {
        self.catalogs = Some(catalogs);
        self
    }

    /// Spend over `[from, to)` grouped by `group_by`, in buckets of `step`
    /// (`None`: hourly when that gives at most
    /// [`spend::MAX_BUCKETS`], else daily), of the instances (and usage) of
    /// `projects` (`None`: all). Open intervals end at `now`.
    /// `InvalidInput` naming `from`, `to` or `step` when the range breaks
    /// the limits.
    pub async fn report(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: GroupBy,
        step: Option<SpendStep>,
        projects: Option<&[ProjectId]>,
        now: DateTime<Utc>,
    ) -> Result<SpendReport, ControlError> {
        let buckets = Buckets::new(ms(from), ms(to), step).map_err(invalid)?;
        let in_scope = |p: &ProjectId| projects.is_none_or(|ps| ps.contains(p));
        let instances: Vec<InstanceRecord> = self
            .store
            .billable_instances(from, to)
            .await?
            .into_iter()
            .filter(|r| in_scope(&r.project_id))
            .collect();
        let usage: Vec<HourlyUsage> = self
            .store
            .hourly_usage(from, to)
            .await?
            .into_iter()
            .filter(|u| in_scope(&u.project_id))
            .collect();
        let gpus = self.gpu_counts(&instances).await;
        let providers = self.providers_of(&instances, &usage).await?;

        let now = ms(now);
        let mut groups: BTreeMap<String, SpendGroup> = BTreeMap::new();
        let mut total = SpendFigures::default();
        let mut unpriced = 0;
        let mut gpu_unknown = 0;
        for r in &instances {
            let Some(b) = billable(r) else { continue };
            let key = instance_key(r, group_by);
            let g = groups.entry(key.clone()).or_insert_with(|| SpendGroup {
                key,
                figures: SpendFigures::default(),
                cost_series: vec![0.0; buckets.len()],
            });
            let hours = b.ms_in(buckets.from(), buckets.to(), now) as f64 / spend::HOUR_MS as f64;
            let cost = b.cost_in(buckets.from(), buckets.to(), now);
            let gpu_hours = match gpus.get(&(r.provider.clone(), r.instance_type.clone())) {
                Some(n) => hours * f64::from(*n),
                None => {
                    gpu_unknown += 1;
                    0.0
                }
            };
            if r.price_per_hour.is_none() {
                unpriced += 1;
            }
            for f in [&mut g.figures, &mut total] {
                f.cost += cost;
                f.instance_hours += hours;
                f.gpu_hours += gpu_hours;
            }
            for (acc, c) in g.cost_series.iter_mut().zip(b.cost_series(&buckets, now)) {
                *acc += c;
            }
        }
        for u in &usage {
            let key = match group_by {
                GroupBy::Provider => providers
                    .get(&u.instance_id)
                    .map_or_else(|| UNKNOWN.to_string(), ToString::to_string),
                _ => usage_key(u, group_by),
            };
            let g = groups.entry(key.clone()).or_insert_with(|| SpendGroup {
                key,
                figures: SpendFigures::default(),
                cost_series: vec![0.0; buckets.len()],
            });
            for f in [&mut g.figures, &mut total] {
                f.prompt_tokens += u.prompt_tokens;
                f.completion_tokens += u.completion_tokens;
            }
        }
        let mut groups: Vec<SpendGroup> = groups.into_values().collect();
        groups.sort_by(|a, b| {
            b.figures
                .cost
                .total_cmp(&a.figures.cost)
                .then_with(|| a.key.cmp(&b.key))
        });
        Ok(SpendReport {
            from,
            to,
            step: buckets.step(),
            group_by,
            timestamps: buckets.starts().into_iter().map(time).collect(),
            total,
            groups,
            unpriced_instances: unpriced,
            gpu_count_unknown_instances: gpu_unknown,
        })
    }

    /// A model's measured cost per million tokens over the trailing
    /// `window` (whole UTC hours of tokens, from the hour `now − window` is
    /// in): its instances' spend over that range / the tokens the router
    /// counted for it. `None` without tokens.
    pub async fn cost_per_million_tokens(
        &self,
        model: &ModelName,
        window: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<f64>, ControlError> {
        Ok(self.model_costs(window, now).await?.remove(model))
    }

    /// Every model's measured cost per million tokens over the trailing
    /// `window` (see [`Self::cost_per_million_tokens`]); models without
    /// tokens are left out.
    pub async fn model_costs(
        &self,
        window: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<BTreeMap<ModelName, f64>, ControlError> {
        let from = gpufleet_store::hour_of(now - window);
        if now <= from {
            return Ok(BTreeMap::new());
        }
        let mut figures: BTreeMap<ModelName, SpendFigures> = BTreeMap::new();
        for u in self.store.hourly_usage(from, now).await? {
            let f = figures.entry(u.model.clone()).or_default();
            f.prompt_tokens += u.prompt_tokens;
            f.completion_tokens += u.completion_tokens;
        }
        for r in self.store.billable_instances(from, now).await? {
            if let (Some(f), Some(b)) = (figures.get_mut(&r.model), billable(&r)) {
                f.cost += b.cost_in(ms(from), ms(now), ms(now));
            }
        }
        Ok(figures
            .into_iter()
            .filter_map(|(m, f)| Some((m, f.cost_per_million_tokens()?)))
            .collect())
    }

    /// The figures `/metrics` exports, read now.
    pub async fn gauges(&self, now: DateTime<Utc>) -> Result<SpendGauges, ControlError> {
        let month = month_start(now);
        let mut out = SpendGauges::default();
        if now > month {
            for r in self.store.billable_instances(month, now).await? {
                let Some(b) = billable(&r) else { continue };
                *out.month_to_date.entry(r.project_id.clone()).or_default() +=
                    b.cost_in(ms(month), ms(now), ms(now));
                if let (None, Some(price)) = (r.billing_ended_at, r.price_per_hour) {
                    out.billable_now.push((r, price));
                }
            }
        }
        // Instances billable since before the month began are in the read
        // above too (their interval overlaps the month).
        out.model_cost_per_million_tokens =
            self.model_costs(chrono::Duration::hours(24), now).await?;
        Ok(out)
    }

    /// GPUs per (provider, instance type), from each provider's catalog
    /// (one read per provider; a provider that does not answer in time
    /// leaves its types unknown).
    async fn gpu_counts(
        &self,
        instances: &[InstanceRecord],
    ) -> HashMap<(ProviderName, String), u32> {
        let mut out = HashMap::new();
        let Some(catalogs) = &self.catalogs else {
            return out;
        };
        let mut providers: Vec<&ProviderName> = instances.iter().map(|r| &r.provider).collect();
        providers.sort();
        providers.dedup();
        for p in providers {
            let Ok(Ok(catalog)) =
                tokio::time::timeout(CATALOG_TIMEOUT, catalogs.catalog(p.as_str())).await
            else {
                continue;
            };
            for t in catalog.instance_types {
                out.insert((p.clone(), t.name), t.gpu.count);
            }
        }
        out
    }

    /// The provider of each instance that usage names (from the billable
    /// instances, else read; instances no longer stored are left out).
    async fn providers_of(
        &self,
        instances: &[InstanceRecord],
        usage: &[HourlyUsage],
    ) -> Result<HashMap<InstanceId, ProviderName>, ControlError> {
        let mut out: HashMap<InstanceId, ProviderName> = instances
            .iter()
            .map(|r| (r.id, r.provider.clone()))
            .collect();
        let mut gone = std::collections::HashSet::new();
        for u in usage {
            if out.contains_key(&u.instance_id) || gone.contains(&u.instance_id) {
                continue;
            }
            match self.store.get_instance(u.instance_id).await? {
                Some(r) => {
                    out.insert(r.id, r.provider);
                }
                None => {
                    gone.insert(u.instance_id);
                }
            }
        }
        Ok(out)
    }
}

fn instance_key(r: &InstanceRecord, group_by: GroupBy) -> String {
    match group_by {
        GroupBy::Project => r.project_id.to_string(),
        GroupBy::Deployment => r
            .deployment_id
            .map_or_else(|| NO_DEPLOYMENT.to_string(), |d| d.to_string()),
        GroupBy::Model => r.model.to_string(),
        GroupBy::Provider => r.provider.to_string(),
    }
}

fn usage_key(u: &HourlyUsage, group_by: GroupBy) -> String {
    match group_by {
        GroupBy::Project => u.project_id.to_string(),
        GroupBy::Deployment => u
            .deployment_id
            .map_or_else(|| NO_DEPLOYMENT.to_string(), |d| d.to_string()),
        GroupBy::Model => u.model.to_string(),
        // Resolved through the instance by the caller.
        GroupBy::Provider => UNKNOWN.to_string(),
    }
}

/// What an instance has cost from its billing start to its end (or
/// `now`); `None` before billing started or without a price.
pub fn instance_cost(r: &InstanceRecord, now: DateTime<Utc>) -> Option<f64> {
    let b = billable(r)?;
    r.price_per_hour?;
    Some(b.cost_in(b.start, b.end_or(ms(now)), ms(now)))
}
