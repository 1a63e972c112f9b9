//! `GET /api/v1/spend`: what the fleet's machines cost over a range, per
//! project, deployment, model or provider, with the tokens served and the
//! cost per million tokens ([`gpufleet_control::Spend`]).

use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::views::ErrorBody;
use crate::SharedState;
use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use gpufleet_control::spend::{SpendFigures, SpendGroup, SpendReport};
use gpufleet_domain::spend::{GroupBy, SpendStep};
use gpufleet_domain::ProjectId;
use serde::{Deserialize, Serialize};

/// The currency of every price and cost (the providers' catalogs').
pub const CURRENCY: &str = "EUR";
/// The default range: the last 7 days.
const DEFAULT_RANGE: chrono::Duration = chrono::Duration::days(7);

/// Query of `GET /api/v1/spend`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SpendParams {
    /// Start of the range, RFC 3339 (default: `to` − 7 days).
    #[param(value_type = Option<DateTime<Utc>>)]
    pub from: Option<String>,
    /// End of the range, RFC 3339 (default: now); after `from`, at most 400 days later.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub to: Option<String>,
    /// What the groups are (default `project`).
    #[param(inline)]
    pub group_by: Option<GroupBy>,
    /// Bucket width of each group's series, aligned to UTC (default: `1h`
    /// when that gives at most 1,500 buckets, else `1d`).
    #[param(inline)]
    pub step: Option<SpendStep>,
    /// Only this project's instances and usage.
    pub project: Option<ProjectId>,
}

/// Cost, hours and tokens of the whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpendTotalView {
    /// Cost in `currency`: billable time × the price per hour each instance
    /// was created at.
    pub cost: f64,
    /// Hours × the GPUs of each instance's type (types whose GPU count is
    /// unknown are left out: see `gpu_count_unknown_instances`).
    pub gpu_hours: f64,
    /// Hours the instances were billable.
    pub instance_hours: f64,
    /// Tokens served (whole UTC hours from the hour `from` is in).
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `cost / (prompt + completion tokens) × 1e6`; null without tokens.
    pub cost_per_million_tokens: Option<f64>,
}

/// A group's cost per bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpendSeriesView {
    /// Each bucket's start (UTC-aligned; the first may precede `from`).
    pub timestamps: Vec<DateTime<Utc>>,
    /// Cost in each bucket (within the range).
    pub cost: Vec<f64>,
}

/// One group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpendGroupView {
    /// The project id, deployment id (`none`: instances of no deployment),
    /// model or provider name (`unknown`: usage of an instance no longer
    /// stored).
    pub key: String,
    pub cost: f64,
    pub gpu_hours: f64,
    pub instance_hours: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_per_million_tokens: Option<f64>,
    pub series: SpendSeriesView,
}

/// `GET /api/v1/spend` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpendView {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub step: SpendStep,
    pub group_by: GroupBy,
    /// ISO 4217 currency of every cost.
    pub currency: String,
    pub total: SpendTotalView,
    /// Most expensive first.
    pub groups: Vec<SpendGroupView>,
    /// Billable instances with no known price (created before prices were
    /// kept): they count 0.
    pub unpriced_instances: u32,
    /// Billable instances whose type's GPU count is unknown (not in `gpu_hours`).
    pub gpu_count_unknown_instances: u32,
}

impl From<&SpendFigures> for SpendTotalView {
    fn from(f: &SpendFigures) -> Self {
        SpendTotalView {
            cost: f.cost,
            gpu_hours: f.gpu_hours,
            instance_hours: f.instance_hours,
            prompt_tokens: f.prompt_tokens,
            completion_tokens: f.completion_tokens,
            cost_per_million_tokens: f.cost_per_million_tokens(),
        }
    }
}

impl SpendGroupView {
    fn new(g: &SpendGroup, timestamps: &[DateTime<Utc>]) -> Self {
        let f = &g.figures;
        SpendGroupView {
            key: g.key.clone(),
            cost: f.cost,
            gpu_hours: f.gpu_hours,
            instance_hours: f.instance_hours,
            prompt_tokens: f.prompt_tokens,
            completion_tokens: f.completion_tokens,
            cost_per_million_tokens: f.cost_per_million_tokens(),
            series: SpendSeriesView {
                timestamps: timestamps.to_vec(),
                cost: g.cost_series.clone(),
            },
        }
    }
}

impl From<&SpendReport> for SpendView {
    fn from(r: &SpendReport) -> Self {
        SpendView {
            from: r.from,
            to: r.to,
            step: r.step,
            group_by: r.group_by,
            currency: CURRENCY.to_string(),
            total: SpendTotalView::from(&r.total),
            groups: r
                .groups
                .iter()
                .map(|g| SpendGroupView::new(g, &r.timestamps))
                .collect(),
            unpriced_instances: r.unpriced_instances,
            gpu_count_unknown_instances: r.gpu_count_unknown_instances,
        }
    }
}

/// An RFC 3339 time as JSON Schema's `date-time` has it (`T` between date
/// and time), else 400 naming `field`.
fn parse_time(field: &'static str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    let bad = |why: String| {
        ApiError::invalid(
            field,
            format!(
                "invalid {field}: {raw:?} is not an RFC 3339 time{why}, e.g. 2025-01-31T12:00:00Z"
            ),
        )
    };
    if !matches!(raw.as_bytes().get(10), Some(b'T' | b't')) {
        return Err(bad(String::new()));
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| bad(format!(" ({e})")))
}

/// Spend over `[from, to)`: a total and one entry per group, each with its
/// cost per bucket. An instance costs its billable time (from when the
/// provider made its machine to when the provider said it is gone, or now)
/// × the price per hour it was created at.
#[utoipa::path(
    get, path = "/api/v1/spend", tag = "spend",
    params(SpendParams),
    responses(
        (status = 200, description = "Spend over the range", body = SpendView),
        (status = 400, description = "Malformed or out-of-range query; `field` names `from`, `to`, `group_by`, `step` or `project`", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn report(
    State(state): State<SharedState>,
    caller: crate::auth::Caller,
    ApiQuery(params): ApiQuery<SpendParams>,
) -> Result<Json<SpendView>, ApiError> {
    let now = Utc::now();
    let to = match &params.to {
        Some(raw) => parse_time("to", raw)?,
        None => now,
    };
    let from = match &params.from {
        Some(raw) => parse_time("from", raw)?,
        None => to - DEFAULT_RANGE,
    };
    // What the caller may read: every project (the admin token) or theirs;
    // another project asked for by name shows nothing.
    let projects = caller.project_filter(params.project);
    let report = state
        .spend
        .report(
            from,
            to,
            params.group_by.unwrap_or(GroupBy::Project),
            params.step,
            projects.as_deref(),
            now,
        )
        .await?;
    Ok(Json(SpendView::from(&report)))
}
