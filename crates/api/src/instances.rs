//! `/api/v1/instances`: create, list, get, terminate, archive, timeline, metrics.

use crate::audit::AuditTarget;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiQuery, InstanceIdPath};
use crate::views::{
    CreateInstancesBody, CreatedInstances, ErrorBody, InstanceList, InstanceMetrics, InstanceView,
    MetricSeriesView, Timeline, TimelineEntryView,
};
use crate::SharedState;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use gpufleet_control::CreateInstances;
use gpufleet_domain::metrics::{parse_step, Step};
use gpufleet_domain::{InstanceId, InstanceStatus, ModelName, Permission, ProjectId, ProviderName};
use gpufleet_store::InstanceFilter;
use serde::Deserialize;

/// Default and largest page of timeline entries.
const EVENTS_DEFAULT_LIMIT: i64 = 100;
const EVENTS_MAX_LIMIT: i64 = 1000;
/// Default and largest number of samples.
const METRICS_DEFAULT_LIMIT: i64 = 60;
const METRICS_MAX_LIMIT: i64 = 1000;

/// Create instances. They start in `provisioning`; background work brings them up.
#[utoipa::path(
    post, path = "/api/v1/instances", tag = "instances",
    request_body = CreateInstancesBody,
    responses(
        (status = 202, description = "Instances recorded; provisioning starts. With an `Idempotency-Key` used before (in this project, within a day) for the same request: the instances that request made, as they are now, with `Idempotent-Replayed: true`", body = CreatedInstances),
        (status = 400, description = "Malformed JSON, or invalid input (`field` names it: e.g. an unknown provider, instance type, zone or model, `count` out of range, or a malformed `Idempotency-Key`)", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "The `Idempotency-Key` was used (in this project, within a day) with a different request", body = ErrorBody),
        (status = 503, description = "The provider's catalog is unavailable; retry", body = ErrorBody),
    ),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe: up to 255 visible ASCII characters (quoted as a Structured Field string, or not), unique per intended request, e.g. a UUID. A request with a key used before in the same project within a day makes nothing and answers with what the first made"),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateInstancesBody>,
) -> Result<
    (
        StatusCode,
        HeaderMap,
        Extension<AuditTarget>,
        Json<CreatedInstances>,
    ),
    ApiError,
> {
    let key = idempotency_key(&headers)?;
    let asked = parse_project_opt(body.project.as_deref(), "project")?;
    let req = validate_create(body, state.fleet.config().max_instances_per_request)?;
    let project = caller.project_for_create(asked, Permission::Operate)?;
    let mut answer = HeaderMap::new();
    let (created, message) = match key {
        None => {
            let created = state
                .fleet
                .create_instances_in(project.clone(), req)
                .await?;
            let message = format!("{} instance(s) created", created.len());
            (created, message)
        }
        Some(key) => {
            let once = state
                .fleet
                .create_instances_once(project.clone(), req, key)
                .await?;
            let message = if once.replayed {
                answer.insert("idempotent-replayed", HeaderValue::from_static("true"));
                format!(
                    "replayed: the {} instance(s) an earlier request with this Idempotency-Key created",
                    once.instances.len()
                )
            } else {
                format!("{} instance(s) created", once.instances.len())
            };
            (once.instances, message)
        }
    };
    let ids: Vec<String> = created.iter().map(|r| r.id.to_string()).collect();
    let instances = created.iter().map(InstanceView::from).collect();
    Ok((
        StatusCode::ACCEPTED,
        answer,
        Extension(AuditTarget::new(ids.join(","), Some(&project)).with_message(message)),
        Json(CreatedInstances { instances }),
    ))
}

/// The request header that makes a create safe to retry.
pub(crate) const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// The `Idempotency-Key` header, if sent: 1 to 255 visible ASCII
/// characters, bare or as a Structured Field string (`"..."`, as the IETF
/// draft writes it).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(raw) = values.next() else {
        return Ok(None);
    };
    let invalid =
        |why: &str| ApiError::invalid(IDEMPOTENCY_KEY, format!("{IDEMPOTENCY_KEY} {why}"));
    if values.next().is_some() {
        return Err(invalid("must be sent once"));
    }
    let text = raw
        .to_str()
        .map_err(|_| invalid("must be visible ASCII characters"))?;
    let key = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => inner,
        None => text,
    };
    if key.is_empty() || key.len() > 255 {
        return Err(invalid("must be 1 to 255 characters long"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) || key.contains(['"', '\\']) {
        return Err(invalid(
            "must be visible ASCII characters without quotes or backslashes (e.g. a UUID)",
        ));
    }
    Ok(Some(key.to_string()))
}

/// An optional `project` field or parameter.
pub(crate) fn parse_project_opt(
    raw: Option<&str>,
    field: &'static str,
) -> Result<Option<ProjectId>, ApiError> {
    raw.map(|p| {
        p.parse::<ProjectId>()
            .map_err(|e| ApiError::invalid(field, e.to_string()))
    })
    .transpose()
}

/// The instance, if the caller may do `need` in its project; a project
/// the caller has no role in answers as if the instance did not exist.
async fn reach(
    state: &SharedState,
    caller: &Caller,
    id: InstanceId,
    need: Permission,
) -> Result<gpufleet_store::InstanceRecord, ApiError> {
    let rec = state.fleet.get_instance(id).await?;
    caller.check(&rec.project_id, need, || {
        ApiError::not_found(format!("instance {id} not found"))
    })?;
    Ok(rec)
}

/// Edge validation: names parse, count in range. Existence checks are Fleet's.
fn validate_create(body: CreateInstancesBody, max_count: u32) -> Result<CreateInstances, ApiError> {
    let provider: ProviderName = body
        .provider
        .parse()
        .map_err(|e| ApiError::invalid("provider", format!("{e}")))?;
    let model: ModelName = body
        .model
        .parse()
        .map_err(|e| ApiError::invalid("model", format!("{e}")))?;
    if body.instance_type.trim().is_empty() {
        return Err(ApiError::invalid(
            "instance_type",
            "instance_type must not be empty",
        ));
    }
    let zone = match body.zone {
        Some(z) if z.trim().is_empty() => {
            return Err(ApiError::invalid(
                "zone",
                "zone must not be empty (omit it for the default)",
            ))
        }
        z => z,
    };
    let count = body.count.unwrap_or(1);
    if count == 0 || count > max_count {
        return Err(ApiError::invalid(
            "count",
            format!("count must be between 1 and {max_count}, got {count}"),
        ));
    }
    Ok(CreateInstances {
        provider,
        zone,
        instance_type: body.instance_type,
        model,
        count,
    })
}

/// Query of `GET /api/v1/instances`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Comma-separated statuses, e.g. `ready,unhealthy` (no blanks, no empty
    /// items). Default: all but archived.
    #[param(value_type = Option<Vec<InstanceStatus>>, style = Form, explode = false, min_items = 1)]
    pub status: Option<String>,
    /// Include archived instances (default false).
    pub include_archived: Option<bool>,
    /// Only this provider's instances.
    #[param(value_type = Option<ProviderName>)]
    pub provider: Option<String>,
    /// At most this many instances (at least 1).
    #[param(minimum = 1)]
    pub limit: Option<i64>,
    /// Only this project's instances.
    #[param(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,38}$")]
    pub project: Option<String>,
}

impl ListParams {
    fn filter(self) -> Result<InstanceFilter, ApiError> {
        let statuses = match self.status.as_deref() {
            None => Vec::new(),
            // Exactly as the document says: no blanks, no empty items.
            Some(s) => s
                .split(',')
                .map(|p| {
                    p.parse::<InstanceStatus>()
                        .map_err(|e| ApiError::invalid("status", e.to_string()))
                })
                .collect::<Result<_, _>>()?,
        };
        let provider = self
            .provider
            .map(|p| p.parse::<ProviderName>())
            .transpose()
            .map_err(|e| ApiError::invalid("provider", e.to_string()))?;
        let limit = self.limit.map(|l| check_limit(l, i64::MAX)).transpose()?;
        Ok(InstanceFilter {
            statuses,
            include_archived: self.include_archived.unwrap_or(false),
            provider,
            projects: None,
            limit,
        })
    }
}

/// A `limit` of at least 1, capped at `max`.
fn check_limit(limit: i64, max: i64) -> Result<i64, ApiError> {
    if limit < 1 {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be at least 1, got {limit}"),
        ));
    }
    Ok(limit.min(max))
}

/// List instances, oldest first.
#[utoipa::path(
    get, path = "/api/v1/instances", tag = "instances",
    params(ListParams),
    responses(
        (status = 200, description = "Instances", body = InstanceList),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<InstanceList>, ApiError> {
    let project = parse_project_opt(params.project.as_deref(), "project")?;
    let mut filter = params.filter()?;
    filter.projects = caller.project_filter(project);
    let records = state.fleet.list_instances(&filter).await?;
    Ok(Json(InstanceList::from_records(&records)))
}

/// One instance.
#[utoipa::path(
    get, path = "/api/v1/instances/{id}", tag = "instances",
    params(("id" = InstanceId, Path, description = "Instance id, `i-` and 32 lowercase hex digits")),
    responses(
        (status = 200, description = "The instance", body = InstanceView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<SharedState>,
    caller: Caller,
    InstanceIdPath(id): InstanceIdPath,
) -> Result<Json<InstanceView>, ApiError> {
    let rec = reach(&state, &caller, id, Permission::Read).await?;
    Ok(Json(InstanceView::from(&rec)))
}

/// Ask for termination. Idempotent: a terminating or terminated instance is returned as it is.
#[utoipa::path(
    delete, path = "/api/v1/instances/{id}", tag = "instances",
    params(("id" = InstanceId, Path, description = "Instance id")),
    responses(
        (status = 202, description = "Termination requested (or already under way)", body = InstanceView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "The instance cannot be terminated now", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn terminate(
    State(state): State<SharedState>,
    caller: Caller,
    InstanceIdPath(id): InstanceIdPath,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<InstanceView>), ApiError> {
    reach(&state, &caller, id, Permission::Operate).await?;
    let rec = state.fleet.terminate_instance(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Extension(AuditTarget::new(id, Some(&rec.project_id))),
        Json(InstanceView::from(&rec)),
    ))
}

/// Hide a terminated (or cleaned-up failed) instance from default listings.
#[utoipa::path(
    post, path = "/api/v1/instances/{id}/archive", tag = "instances",
    params(("id" = InstanceId, Path, description = "Instance id")),
    responses(
        (status = 200, description = "Archived", body = InstanceView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "Not terminated yet", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn archive(
    State(state): State<SharedState>,
    caller: Caller,
    InstanceIdPath(id): InstanceIdPath,
) -> Result<(Extension<AuditTarget>, Json<InstanceView>), ApiError> {
    reach(&state, &caller, id, Permission::Operate).await?;
    let rec = state.fleet.archive_instance(id).await?;
    Ok((
        Extension(AuditTarget::new(id, Some(&rec.project_id))),
        Json(InstanceView::from(&rec)),
    ))
}

/// Query of `GET /api/v1/instances/{id}/events`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Only entries with an id above this (for paging / following).
    pub after: Option<i64>,
    /// At most this many entries (default 100; more than 1000 reads as 1000).
    #[param(minimum = 1)]
    pub limit: Option<i64>,
}

/// The instance's timeline, oldest first.
#[utoipa::path(
    get, path = "/api/v1/instances/{id}/events", tag = "instances",
    params(("id" = InstanceId, Path, description = "Instance id"), EventsParams),
    responses(
        (status = 200, description = "Timeline", body = Timeline),
        (status = 400, description = "Malformed id or query", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn timeline(
    State(state): State<SharedState>,
    caller: Caller,
    InstanceIdPath(id): InstanceIdPath,
    ApiQuery(params): ApiQuery<EventsParams>,
) -> Result<Json<Timeline>, ApiError> {
    let limit = check_limit(
        params.limit.unwrap_or(EVENTS_DEFAULT_LIMIT),
        EVENTS_MAX_LIMIT,
    )?;
    reach(&state, &caller, id, Permission::Read).await?;
    let events = state.fleet.instance_events(id, params.after, limit).await?;
    Ok(Json(Timeline {
        instance_id: id,
        events: events.iter().map(TimelineEntryView::from).collect(),
    }))
}

/// Query of `GET /api/v1/instances/{id}/metrics`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsParams {
    /// At most this many recent samples (default 60; more than 1000 reads as 1000).
    #[param(minimum = 1)]
    pub limit: Option<i64>,
    /// Start of the history window, RFC 3339 (default: `to` − 1 h).
    #[param(value_type = Option<DateTime<Utc>>)]
    pub from: Option<String>,
    /// End of the history window, RFC 3339 (default: now).
    #[param(value_type = Option<DateTime<Utc>>)]
    pub to: Option<String>,
    /// Bucket width (default: the finest giving at most 1,500 buckets).
    #[param(value_type = Option<crate::views::MetricStep>, inline)]
    pub step: Option<String>,
}

/// Recent heartbeat samples (oldest first) and the latest one; with any of
/// `from`, `to`, `step`, also `series`: the history over the window (5
/// minutes to 30 days, at most 1,500 buckets) in aligned buckets, per GPU
/// where it applies, read from raw samples, 1-minute or 1-hour rollups
/// (whichever fits the step and still holds the window).
#[utoipa::path(
    get, path = "/api/v1/instances/{id}/metrics", tag = "instances",
    params(("id" = InstanceId, Path, description = "Instance id"), MetricsParams),
    responses(
        (status = 200, description = "Samples (and series)", body = InstanceMetrics),
        (status = 400, description = "Malformed id or query; `field` names `from`, `to`, `step` or `limit`", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Your role does not allow this", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn metrics(
    State(state): State<SharedState>,
    caller: Caller,
    InstanceIdPath(id): InstanceIdPath,
    ApiQuery(params): ApiQuery<MetricsParams>,
) -> Result<Json<InstanceMetrics>, ApiError> {
    let limit = check_limit(
        params.limit.unwrap_or(METRICS_DEFAULT_LIMIT),
        METRICS_MAX_LIMIT,
    )?;
    let window = history_window(&params)?;
    reach(&state, &caller, id, Permission::Read).await?;
    let newest_first = state.fleet.instance_samples(id, limit).await?;
    let mut metrics = InstanceMetrics::from_newest_first(id, &newest_first);
    if let Some((from, to, step)) = window {
        let series = state.history.metric_series(id, from, to, step).await?;
        metrics.series = Some(MetricSeriesView::from(&series));
    }
    Ok(Json(metrics))
}

type Window = (DateTime<Utc>, DateTime<Utc>, Option<Step>);

/// The history window asked for, if any of `from`, `to`, `step` is given.
/// Parsing happens here; the limits are checked by the Fleet.
fn history_window(p: &MetricsParams) -> Result<Option<Window>, ApiError> {
    if p.from.is_none() && p.to.is_none() && p.step.is_none() {
        return Ok(None);
    }
    let time = |field: &'static str, raw: &str| {
        // RFC 3339 as JSON Schema's `date-time` has it: `T` (or `t`) between
        // date and time, where chrono would take a blank too.
        if !matches!(raw.as_bytes().get(10), Some(b'T' | b't')) {
            return Err(ApiError::invalid(
                field,
                format!(
                    "invalid {field}: {raw:?} is not an RFC 3339 time, e.g. 2025-01-31T12:00:00Z"
                ),
            ));
        }
        DateTime::parse_from_rfc3339(raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                ApiError::invalid(
                    field,
                    format!("invalid {field}: {raw:?} is not an RFC 3339 time ({e}), e.g. 2025-01-31T12:00:00Z"),
                )
            })
    };
    let to = match &p.to {
        Some(raw) => time("to", raw)?,
        None => Utc::now(),
    };
    let from = match &p.from {
        Some(raw) => time("from", raw)?,
        None => to - chrono::Duration::hours(1),
    };
    let step = p
        .step
        .as_deref()
        .map(parse_step)
        .transpose()
        .map_err(|e| ApiError::invalid("step", format!("invalid step: {e}")))?;
    Ok(Some((from, to, step)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> CreateInstancesBody {
        CreateInstancesBody {
            project: None,
            provider: "mock".into(),
            zone: None,
            instance_type: "t".into(),
            model: "gpufleet/sim-small".into(),
            count: None,
        }
    }

    #[test]
    fn create_is_validated_at_the_edge() {
        let ok = validate_create(body(), 3).unwrap();
        assert_eq!(ok.count, 1);
        let field = |b, max| {
            validate_create(b, max)
                .unwrap_err()
                .field()
                .map(str::to_string)
        };
        assert_eq!(
            field(
                CreateInstancesBody {
                    provider: "Bad!".into(),
                    ..body()
                },
                3
            )
            .as_deref(),
            Some("provider")
        );
        assert_eq!(
            field(
                CreateInstancesBody {
                    model: "bad model".into(),
                    ..body()
                },
                3
            )
            .as_deref(),
            Some("model")
        );
        assert_eq!(
            field(
                CreateInstancesBody {
                    count: Some(0),
                    ..body()
                },
                3
            )
            .as_deref(),
            Some("count")
        );
        assert_eq!(
            field(
                CreateInstancesBody {
                    count: Some(4),
                    ..body()
                },
                3
            )
            .as_deref(),
            Some("count")
        );
        assert_eq!(
            field(
                CreateInstancesBody {
                    instance_type: " ".into(),
                    ..body()
                },
                3
            )
            .as_deref(),
            Some("instance_type")
        );
        assert_eq!(
            field(
                CreateInstancesBody {
                    zone: Some(String::new()),
                    ..body()
                },
                3
            )
            .as_deref(),
            Some("zone")
        );
    }

    #[test]
    fn list_params_parse_statuses() {
        let f = ListParams {
            status: Some("ready,failed".into()),
            ..Default::default()
        }
        .filter()
        .unwrap();
        assert_eq!(
            f.statuses,
            vec![InstanceStatus::Ready, InstanceStatus::Failed]
        );
        for bad in ["ready,bogus", "ready, failed", "", "ready,", ",ready"] {
            let e = ListParams {
                status: Some(bad.into()),
                ..Default::default()
            }
            .filter()
            .unwrap_err();
            assert_eq!(e.field(), Some("status"), "{bad:?}");
        }
        let e = ListParams {
            limit: Some(0),
            ..Default::default()
        }
        .filter()
        .unwrap_err();
        assert_eq!(e.field(), Some("limit"));
    }
}
