//! Requests for a model that has a deployment but no ready replica (scaled
//! to zero, or its first replicas still starting) are held, not refused:
//! the deployment's demand moves forward (which wakes it from zero), and
//! the request waits, in a bounded queue for a bounded time, until the
//! model's pool has a ready instance. Past either bound it gets a 503 in
//! OpenAI's error shape with `Retry-After`. All of it per project: a
//! request waits for its key's project's replicas, and wakes that
//! project's deployments only.

use crate::error::RouterError;
use crate::pool::ModelPool;
use crate::Inner;
use gpufleet_domain::{DeploymentAction, ProjectId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether a model has a deployment is looked up again after this long.
const DEPLOYED_TTL: Duration = Duration::from_secs(2);
/// While held, the demand is written again this often.
const DEMAND_EVERY: Duration = Duration::from_secs(2);
/// `Retry-After` of a request past the bounds, in seconds.
const RETRY_AFTER_SECS: u64 = 10;

#[derive(Default)]
pub(crate) struct Holding {
    /// Requests held per `project/model`.
    held: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// Models whose holding episode is written on their deployments'
    /// timelines (a `hold` written, its `release` not yet).
    episodes: Mutex<std::collections::HashSet<String>>,
    /// Whether a model has a deployment, and when that was learnt.
    deployed: Mutex<HashMap<String, (Instant, bool)>>,
}

/// One held request; leaves the count when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Holding {
    fn take(&self, model: &str, limit: usize) -> Option<Slot> {
        let n = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_string())
            .or_default()
            .clone();
        if n.fetch_add(1, Ordering::Relaxed) >= limit {
            n.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(n))
    }

    /// Whether this starts (`true`) or ends (`false`) an episode for `model`.
    fn flip(&self, model: &str, holding: bool) -> bool {
        let mut e = self.episodes.lock().unwrap_or_else(|p| p.into_inner());
        if holding {
            e.insert(model.to_string())
        } else {
            e.remove(model)
        }
    }

    fn cached(&self, model: &str) -> Option<bool> {
        let d = self.deployed.lock().unwrap_or_else(|p| p.into_inner());
        d.get(model)
            .filter(|(at, _)| at.elapsed() < DEPLOYED_TTL)
            .map(|(_, yes)| *yes)
    }

    fn learn(&self, model: &str, yes: bool) {
        self.deployed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.to_string(), (Instant::now(), yes));
    }
}

/// Note the demand for `model` in `project`: whether a deployment serves it.
async fn demand(
    inner: &Inner,
    project: &ProjectId,
    model: &str,
    slot: &str,
) -> Result<bool, RouterError> {
    let yes = inner.fleet.note_demand_in(project, model).await?;
    inner.holding.learn(slot, yes);
    Ok(yes)
}

/// Write a hold or release on the model's deployments' timelines, in the
/// background.
fn timeline(
    inner: &Inner,
    project: &ProjectId,
    model: &str,
    action: DeploymentAction,
    message: String,
    meta: serde_json::Value,
) {
    let (fleet, model, project) = (inner.fleet.clone(), model.to_string(), project.clone());
    tokio::spawn(async move {
        if let Err(e) = fleet
            .note_hold_in(Some(&project), &model, action, message, meta)
            .await
        {
            tracing::warn!(%model, error = %e, "could not write a hold or release on the deployment's timeline");
        }
    });
}

/// Wait for a ready instance of `model` in `project`, which has none now.
/// `Ok(None)`: no deployment of the project serves it (the caller answers
/// as before).
pub(crate) async fn hold(
    inner: &Inner,
    project: &ProjectId,
    model: &str,
) -> Result<Option<Arc<ModelPool>>, RouterError> {
    let slot_key = format!("{project}/{model}");
    let slot_key = slot_key.as_str();
    if inner.holding.cached(slot_key) == Some(false) {
        return Ok(None);
    }
    let scaling = || RouterError::ScalingUp {
        model: model.to_string(),
        retry_after_secs: RETRY_AFTER_SECS,
    };
    let Some(_slot) = inner.holding.take(slot_key, inner.config.hold_queue) else {
        return Err(scaling());
    };
    if !demand(inner, project, model, slot_key).await? {
        return Ok(None);
    }
    let started = Instant::now();
    let deadline = started + inner.config.hold_timeout();
    let mut noted = started;
    tracing::info!(%model, "no ready replica: holding the request while one starts");
    if inner.holding.flip(slot_key, true) {
        timeline(
            inner,
            project,
            model,
            DeploymentAction::Hold,
            format!(
                "requests for {model} are held: no ready replica yet (at most {} for {} s)",
                inner.config.hold_queue,
                inner.config.hold_timeout().as_secs()
            ),
            serde_json::json!({"hold_queue": inner.config.hold_queue, "hold_timeout_ms": inner.config.hold_timeout_ms}),
        );
    }
    loop {
        let changed = inner.pools.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some(p) = inner.pools.model(project.as_str(), model) {
            let waited_ms = started.elapsed().as_millis() as u64;
            tracing::info!(%model, waited_ms, "a replica is ready: releasing the held request");
            if inner.holding.flip(slot_key, false) {
                timeline(
                    inner,
                    project,
                    model,
                    DeploymentAction::Release,
                    format!("a replica of {model} is ready: the held requests go on (the first waited {waited_ms} ms)"),
                    serde_json::json!({"waited_ms": waited_ms}),
                );
            }
            return Ok(Some(p));
        }
        let wake = (noted + DEMAND_EVERY).min(deadline);
        match tokio::time::timeout_at(wake.into(), changed).await {
            Ok(()) => {}
            Err(_) if Instant::now() >= deadline => {
                if inner.holding.flip(slot_key, false) {
                    timeline(
                        inner,
                        project,
                        model,
                        DeploymentAction::Release,
                        format!(
                            "no replica of {model} was ready within {} s: the held requests got a 503",
                            inner.config.hold_timeout().as_secs()
                        ),
                        serde_json::json!({"timed_out": true}),
                    );
                }
                return Err(scaling());
            }
            Err(_) => {
                demand(inner, project, model, slot_key).await?;
                noted = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    #[test]
    fn the_queue_is_bounded_and_frees_its_slots() {
        let h = Holding::default();
        let a = h.take("m", 2).unwrap();
        let _b = h.take("m", 2).unwrap();
        assert!(h.take("m", 2).is_none(), "a third is refused");
        assert!(h.take("other", 2).is_some(), "per model");
        drop(a);
        assert!(h.take("m", 2).is_some(), "a slot freed");
        h.learn("m", false);
        assert_eq!(h.cached("m"), Some(false));
        assert_eq!(h.cached("n"), None);
    }

    #[tokio::test]
    async fn past_the_bounds_a_503_says_when_to_retry() {
        let r = RouterError::ScalingUp {
            model: "m".into(),
            retry_after_secs: RETRY_AFTER_SECS,
        }
        .into_response();
        assert_eq!(r.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "10");
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "model_scaling_up");
        assert_eq!(v["error"]["type"], "server_error");
    }
}
