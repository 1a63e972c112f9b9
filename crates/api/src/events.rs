//! `GET /api/v1/events`: instance changes as Server-Sent Events.
//!
//! The stream reads the Fleet's broadcast bus; it never polls the database.
//! Order: one `snapshot` event (an [`InstanceList`] of the current non-archived
//! instances), then one `instance` event per change (an [`InstanceView`], SSE
//! `id` = its generation). A subscriber that falls behind the bus gets a
//! `resync` event holding a fresh snapshot. Keep-alive comments every 15 s.
//! Streams end when the server shuts down (see [`crate::serve`]).

use crate::error::ApiError;
use crate::extract::{parse_instance_id, ApiQuery};
use crate::views::{ErrorBody, InstanceList, InstanceView};
use crate::{SharedState, StreamsShutdown};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Extension;
use futures::stream::{self, Stream, StreamExt};
use gpufleet_control::{Fleet, InstanceChange};
use gpufleet_domain::{InstanceId, ProjectId};
use gpufleet_store::InstanceFilter;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::{error::RecvError, Receiver};

/// Interval of keep-alive comments.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// SSE event names.
pub mod names {
    pub const SNAPSHOT: &str = "snapshot";
    pub const INSTANCE: &str = "instance";
    pub const RESYNC: &str = "resync";
}

/// Query of `GET /api/v1/events`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Only this instance's changes (and only it in snapshots).
    #[param(value_type = Option<InstanceId>)]
    pub instance: Option<String>,
}

/// Stream instance changes (`text/event-stream`).
#[utoipa::path(
    get, path = "/api/v1/events", tag = "events",
    params(StreamParams),
    responses(
        (status = 200, content_type = "text/event-stream",
         description = "Events `snapshot` and `resync` (data: InstanceList) and `instance` (data: InstanceView)",
         body = InstanceList),
        (status = 400, description = "Malformed `instance`", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn stream(
    State(state): State<SharedState>,
    caller: crate::auth::Caller,
    shutdown: Option<Extension<StreamsShutdown>>,
    ApiQuery(params): ApiQuery<StreamParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let only = params
        .instance
        .as_deref()
        .map(|s| parse_instance_id("instance", s))
        .transpose()?;
    // Subscribe before reading the snapshot: a change racing the read shows up
    // as an event after it rather than being lost.
    let rx = state.fleet.subscribe();
    let projects = caller.visible_projects();
    let first = snapshot(&state.fleet, only, &projects).await?;
    let feed = Feed {
        fleet: state.fleet.clone(),
        rx,
        only,
        projects,
    };
    let events = stream::once(async move { json_event(names::SNAPSHOT, None, &first) })
        .chain(stream::unfold(feed, Feed::next))
        .map(Ok);
    let stopped = async move {
        match shutdown {
            Some(Extension(s)) => s.0.cancelled_owned().await,
            None => std::future::pending().await,
        }
    };
    Ok(Sse::new(events.take_until(stopped)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Current non-archived instances (or the one asked for).
async fn snapshot(
    fleet: &Fleet,
    only: Option<InstanceId>,
    projects: &Option<Vec<ProjectId>>,
) -> Result<InstanceList, ApiError> {
    let filter = InstanceFilter {
        projects: projects.clone(),
        ..InstanceFilter::default()
    };
    let mut records = fleet.list_instances(&filter).await?;
    if let Some(id) = only {
        records.retain(|r| r.id == id);
    }
    Ok(InstanceList::from_records(&records))
}

struct Feed {
    fleet: Fleet,
    rx: Receiver<InstanceChange>,
    only: Option<InstanceId>,
    /// The projects the subscriber may see (`None`: all).
    projects: Option<Vec<ProjectId>>,
}

impl Feed {
    /// The next event, or `None` to end the stream.
    async fn next(mut self) -> Option<(Event, Feed)> {
        loop {
            match self.rx.recv().await {
                Ok(change) => {
                    if self.only.is_some_and(|id| id != change.instance.id) {
                        continue;
                    }
                    if let Some(ps) = &self.projects {
                        if !ps.contains(&change.instance.project_id) {
                            continue;
                        }
                    }
                    let view = InstanceView::from(&change.instance);
                    let ev = json_event(names::INSTANCE, Some(view.generation), &view);
                    return Some((ev, self));
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "event stream subscriber lagged; sending a resync");
                    match snapshot(&self.fleet, self.only, &self.projects).await {
                        Ok(list) => return Some((json_event(names::RESYNC, None, &list), self)),
                        // Already logged by ApiError; the client reconnects and gets a snapshot.
                        Err(_) => return None,
                    }
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

fn json_event<T: Serialize>(name: &str, id: Option<i64>, data: &T) -> Event {
    let ev = Event::default().event(name);
    let ev = match id {
        Some(id) => ev.id(id.to_string()),
        None => ev,
    };
    match ev.json_data(data) {
        Ok(ev) => ev,
        Err(e) => {
            tracing::error!(error = %e, event = name, "could not serialise an SSE event");
            Event::default().comment("serialisation failed")
        }
    }
}
