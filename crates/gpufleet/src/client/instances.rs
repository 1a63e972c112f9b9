//! `gpufleet instances ...`.

use super::render;
use super::sse;
use super::{print_json, Client};
use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use gpufleet_api::views::{
    CreateInstancesBody, CreatedInstances, InstanceList, InstanceView, Timeline,
};
use gpufleet_domain::{InstanceId, InstanceStatus};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum InstancesCommand {
    /// Create instances; `--wait` follows them to ready with a progress bar.
    Create(CreateArgs),
    /// List instances (archived ones with --all).
    List {
        /// Only instances in this status (e.g. ready, failed).
        #[arg(long)]
        status: Option<InstanceStatus>,
        /// Include archived instances.
        #[arg(long)]
        all: bool,
    },
    /// Show one instance.
    Get { id: InstanceId },
    /// Show an instance's timeline.
    Events { id: InstanceId },
    /// Terminate instances (idempotent).
    Terminate {
        #[arg(required = true)]
        ids: Vec<InstanceId>,
        /// Wait until they are terminated.
        #[arg(long)]
        wait: bool,
        /// Longest to wait, e.g. 90s, 10m.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Archive a terminated (or cleaned-up failed) instance: hidden from the default list.
    Archive { id: InstanceId },
    /// An instance's figures over a window: a table, or sparklines in a terminal.
    Metrics(super::metrics::MetricsArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Provider name, e.g. mock.
    #[arg(long)]
    pub provider: String,
    /// Instance type (see `gpufleet providers types <provider>`).
    #[arg(long = "type")]
    pub instance_type: String,
    /// Model to serve (see `gpufleet models`).
    #[arg(long)]
    pub model: String,
    /// Zone [default: the first zone offering the type].
    #[arg(long)]
    pub zone: Option<String>,
    /// How many instances.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// The project that will own them [default: yours, when you have one;
    /// `default` with the admin token].
    #[arg(long)]
    pub project: Option<String>,
    /// Follow the instances until ready; exit non-zero if one fails.
    #[arg(long)]
    pub wait: bool,
    /// Longest to wait, e.g. 90s, 10m.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Makes running this command again safe: a create with a key used in
    /// the last day (same project, same request) makes nothing and shows the
    /// instances the first made. Up to 255 visible ASCII characters, e.g. a
    /// UUID [default: a new random key, kept across this command's own
    /// retries].
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// "250ms", "90s", "10m", "1h", "7d"; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s or 10m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}: use ms, s, m, h or d"
            ))
        }
    };
    Ok(d)
}

pub async fn run(client: &Client, cmd: InstancesCommand) -> anyhow::Result<()> {
    match cmd {
        InstancesCommand::Create(args) => create(client, args).await,
        InstancesCommand::List { status, all } => {
            let mut query = Vec::new();
            if let Some(s) = status {
                query.push(format!("status={s}"));
            }
            if all {
                query.push("include_archived=true".to_string());
            }
            let path = if query.is_empty() {
                "/api/v1/instances".to_string()
            } else {
                format!("/api/v1/instances?{}", query.join("&"))
            };
            let list: InstanceList = client.get(&path).await?;
            if client.json {
                return print_json(&list);
            }
            if list.instances.is_empty() {
                println!("no instances");
            } else {
                println!("{}", render::instances_table(&list.instances));
            }
            Ok(())
        }
        InstancesCommand::Get { id } => {
            let inst: InstanceView = client.get(&format!("/api/v1/instances/{id}")).await?;
            if client.json {
                return print_json(&inst);
            }
            print!("{}", render::instance_details(&inst));
            Ok(())
        }
        InstancesCommand::Events { id } => {
            let tl: Timeline = client
                .get(&format!("/api/v1/instances/{id}/events"))
                .await?;
            if client.json {
                return print_json(&tl);
            }
            println!("{}", render::timeline_table(&tl.events));
            Ok(())
        }
        InstancesCommand::Terminate { ids, wait, timeout } => {
            let mut views = Vec::new();
            for id in &ids {
                let resp = client
                    .request(Method::DELETE, &format!("/api/v1/instances/{id}"))
                    .send()
                    .await
                    .map_err(|e| client.transport_error(e))?;
                let resp = client.check(resp).await?;
                let text = resp.text().await.unwrap_or_default();
                match serde_json::from_str::<InstanceView>(&text) {
                    Ok(v) => views.push(v),
                    Err(_) => views.push(client.get(&format!("/api/v1/instances/{id}")).await?),
                }
                if !client.json && !wait {
                    println!("{id}: termination requested");
                }
            }
            if wait {
                views = wait_for(client, &ids, Target::Terminated, timeout).await?;
            }
            if client.json {
                return print_json(&InstanceList { instances: views });
            }
            if wait {
                for v in &views {
                    println!("{}: {}", v.id, v.status);
                }
            }
            Ok(())
        }
        InstancesCommand::Metrics(args) => super::metrics::run(client, args).await,
        InstancesCommand::Archive { id } => {
            let v: InstanceView = client
                .post(&format!("/api/v1/instances/{id}/archive"), &())
                .await?;
            if client.json {
                return print_json(&v);
            }
            println!("{}: {}", v.id, v.status);
            Ok(())
        }
    }
}

async fn create(client: &Client, args: CreateArgs) -> anyhow::Result<()> {
    let body = CreateInstancesBody {
        project: args.project,
        provider: args.provider,
        zone: args.zone,
        instance_type: args.instance_type,
        model: args.model,
        count: Some(args.count),
    };
    let key = match args.idempotency_key {
        Some(k)
            if (1..=255).contains(&k.len())
                && k.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') =>
        {
            k
        }
        Some(_) => bail!(
            "--idempotency-key must be 1 to 255 visible ASCII characters without quotes or \
             backslashes, e.g. a UUID"
        ),
        None => format!("cli-{:032x}", rand::random::<u128>()),
    };
    let created = post_once(client, &body, &key).await?;
    if !args.wait {
        if client.json {
            return print_json(&created);
        }
        println!("{}", render::instances_table(&created.instances));
        return Ok(());
    }
    let ids: Vec<InstanceId> = created.instances.iter().map(|i| i.id).collect();
    let done = wait_for(client, &ids, Target::Ready, args.timeout).await?;
    if client.json {
        return print_json(&InstanceList { instances: done });
    }
    println!("{}", render::instances_table(&done));
    Ok(())
}

/// How many times a create is sent when the server cannot be reached or
/// answers 502, 503 or 504.
const CREATE_TRIES: u32 = 3;

/// POST the create with `key` as its `Idempotency-Key`, retrying what may
/// not have reached the server (or may have, unanswered): the key makes a
/// retry of a recorded create make nothing twice.
async fn post_once(
    client: &Client,
    body: &CreateInstancesBody,
    key: &str,
) -> anyhow::Result<CreatedInstances> {
    let mut attempt = 1;
    loop {
        let req = client
            .request(Method::POST, "/api/v1/instances")
            .header("Idempotency-Key", key)
            .json(body);
        let transient = match req.send().await {
            Ok(resp) if attempt < CREATE_TRIES && matches!(resp.status().as_u16(), 502..=504) => {
                format!("{} answered {}", client.base(), resp.status())
            }
            Ok(resp) => return client.answer(resp).await,
            Err(e) if attempt < CREATE_TRIES && !e.is_builder() => {
                client.transport_error(e).to_string()
            }
            Err(e) => return Err(client.transport_error(e)),
        };
        let wait = Duration::from_secs(u64::from(attempt));
        eprintln!(
            "{transient}; retrying in {} s with the same Idempotency-Key ({attempt}/{})",
            wait.as_secs(),
            CREATE_TRIES - 1
        );
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Ready,
    Terminated,
}

/// Where an instance stands relative to the target.
enum Verdict {
    Pending,
    Reached,
    Failed(String),
}

fn judge(v: &InstanceView, target: Target) -> Verdict {
    use InstanceStatus as S;
    match (target, v.status) {
        (Target::Ready, S::Ready) => Verdict::Reached,
        (Target::Ready, S::Failed) => Verdict::Failed(format!(
            "instance {} failed: {}{}",
            v.id,
            v.status_reason
                .map(|r| r.as_str())
                .unwrap_or("unknown reason"),
            v.status_message
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        )),
        (Target::Ready, s @ (S::Terminating | S::Terminated | S::Archived | S::Draining)) => {
            Verdict::Failed(format!(
                "instance {} is {s} and will not become ready",
                v.id
            ))
        }
        (Target::Terminated, S::Terminated | S::Archived) => Verdict::Reached,
        _ => Verdict::Pending,
    }
}

/// The instances an SSE `data:` payload carries: one instance (`instance`
/// events), or a list under `instances` (`snapshot` and `resync` events).
pub(crate) fn instances_from_event(data: &str) -> Vec<InstanceView> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(data) else {
        return Vec::new();
    };
    if let Some(list) = value.get("instances") {
        return serde_json::from_value(list.clone()).unwrap_or_default();
    }
    serde_json::from_value::<InstanceView>(value)
        .into_iter()
        .collect()
}

/// Follows `ids` through `GET /api/v1/events` until each reaches `target`;
/// shows one progress bar per instance. Re-reads the instances now and then
/// in case the stream lags or drops.
async fn wait_for(
    client: &Client,
    ids: &[InstanceId],
    target: Target,
    timeout: Duration,
) -> anyhow::Result<Vec<InstanceView>> {
    let deadline = Instant::now() + timeout;
    let multi = if client.json {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    };
    let style =
        ProgressStyle::with_template("{prefix} [{bar:30.cyan/blue}] {pos:>3}% {msg} ({elapsed})")
            .context("progress bar template")?
            .progress_chars("=> ");
    let mut bars: BTreeMap<InstanceId, ProgressBar> = BTreeMap::new();
    for id in ids {
        let bar = multi.add(ProgressBar::new(100));
        bar.set_style(style.clone());
        bar.set_prefix(id.to_string());
        bars.insert(*id, bar);
    }

    let mut stream = match client
        .request(Method::GET, "/api/v1/events")
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
    {
        Ok(resp) if resp.status().is_success() => Some(Box::pin(sse::events(resp))),
        Ok(resp) => {
            tracing::warn!(status = %resp.status(), "cannot follow /api/v1/events; polling instead");
            None
        }
        Err(e) => return Err(client.transport_error(e)),
    };

    let mut latest: BTreeMap<InstanceId, InstanceView> = BTreeMap::new();
    let mut resync = tokio::time::interval(Duration::from_secs(2));
    let outcome: anyhow::Result<()> = loop {
        let mut fresh: Vec<InstanceView> = Vec::new();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                let pending: Vec<String> = ids
                    .iter()
                    .filter(|id| !matches!(latest.get(id).map(|v| judge(v, target)), Some(Verdict::Reached)))
                    .map(|id| format!("{id} ({})", latest.get(id).map(|v| v.status.to_string()).unwrap_or_default()))
                    .collect();
                break Err(anyhow!("timed out after {timeout:?} waiting for: {}", pending.join(", ")));
            }
            _ = resync.tick() => {
                for id in ids {
                    fresh.push(client.get(&format!("/api/v1/instances/{id}")).await?);
                }
            }
            item = next_event(&mut stream) => match item {
                StreamItem::Event(ev) => fresh.extend(instances_from_event(&ev.data)),
                StreamItem::Broken(why) => {
                    tracing::warn!(error = %why, "event stream broke; polling instead");
                    stream = None;
                    resync = tokio::time::interval(Duration::from_millis(500));
                }
            },
        }
        for v in fresh {
            let Some(bar) = bars.get(&v.id) else { continue };
            if latest
                .get(&v.id)
                .is_some_and(|old| old.generation > v.generation)
            {
                continue;
            }
            bar.set_position(u64::from(v.progress));
            bar.set_message(v.status.to_string());
            latest.insert(v.id, v);
        }
        let mut failure = None;
        let mut all_done = true;
        for id in ids {
            match latest.get(id).map(|v| judge(v, target)) {
                Some(Verdict::Reached) => {
                    if let Some(bar) = bars.get(id) {
                        if !bar.is_finished() {
                            bar.finish();
                        }
                    }
                }
                Some(Verdict::Failed(why)) => {
                    failure.get_or_insert(why);
                }
                Some(Verdict::Pending) | None => all_done = false,
            }
        }
        if let Some(why) = failure {
            break Err(anyhow!(why).context("waiting for instances"));
        }
        if all_done {
            break Ok(());
        }
    };
    for bar in bars.values() {
        if !bar.is_finished() {
            bar.abandon();
        }
    }
    outcome?;
    let views: Vec<InstanceView> = ids.iter().filter_map(|id| latest.remove(id)).collect();
    if views.len() != ids.len() {
        bail!("lost track of some instances");
    }
    Ok(views)
}

/// What the event stream yielded.
enum StreamItem {
    Event(sse::Event),
    /// The stream failed or the server closed it.
    Broken(String),
}

/// The next event, or never when there is no stream (so `select!` waits on the
/// other branches only).
async fn next_event<S>(stream: &mut Option<S>) -> StreamItem
where
    S: futures::Stream<Item = Result<sse::Event, reqwest::Error>> + Unpin,
{
    match stream {
        Some(s) => match s.next().await {
            Some(Ok(ev)) => StreamItem::Event(ev),
            Some(Err(e)) => StreamItem::Broken(e.to_string()),
            None => StreamItem::Broken("the server closed the stream".to_string()),
        },
        None => futures::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_one_instance_or_a_list() {
        assert!(instances_from_event("not json").is_empty());
        assert!(instances_from_event("{\"instances\": []}").is_empty());
        assert!(instances_from_event("{\"id\": 1}").is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
