//! `gpufleet deployments ...`: declare a model's serving and let the
//! control plane keep it (replicas, replacement, autoscaling).

use super::instances::parse_duration;
use super::render;
use super::{print_json, Client};
use anyhow::{anyhow, bail};
use gpufleet_api::views::{
    CreateDeploymentBody, DeploymentList, DeploymentTimeline, DeploymentView, PatchDeploymentBody,
};
use gpufleet_domain::{
    Autoscaling, DeploymentId, DeploymentState, HumanDuration, Placement, ReplicaBounds,
    ScalingMetric,
};
use reqwest::Method;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeploymentsCommand {
    /// Declare a deployment; `--wait` returns once its replicas are ready.
    Create(CreateArgs),
    /// List deployments (deleted ones with --all).
    List {
        /// Include deleted deployments.
        #[arg(long)]
        all: bool,
    },
    /// Show one deployment (by id or name) and its instances.
    Get { deployment: String },
    /// Show a deployment's timeline: every decision with its reason.
    Events { deployment: String },
    /// Change the replica bounds; `--wait` returns once enough are ready.
    Scale {
        deployment: String,
        /// Exactly this many replicas (min = max = N).
        #[arg(long, conflicts_with_all = ["min", "max"])]
        replicas: Option<u32>,
        #[arg(long)]
        min: Option<u32>,
        #[arg(long)]
        max: Option<u32>,
        #[arg(long)]
        wait: bool,
        /// Longest to wait, e.g. 90s, 10m.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Change the name, autoscaling or scale-to-zero delay.
    Update(UpdateArgs),
    /// Delete: its instances drain, then terminate.
    Delete {
        deployment: String,
        /// Wait until every instance is terminated.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// Lowercase letters, digits and '-'.
    pub name: String,
    /// The project that will own it [default: yours, when you have one;
    /// `default` with the admin token].
    #[arg(long)]
    pub project: Option<String>,
    /// Model to serve (see `gpufleet models`).
    #[arg(long)]
    pub model: String,
    /// Where replicas may run, as provider/zone/type, in order of
    /// preference (repeat the flag; see `gpufleet providers types <provider>`).
    #[arg(long = "placement", required = true, value_parser = parse_placement)]
    pub placements: Vec<Placement>,
    #[arg(long, default_value_t = 1)]
    pub min: u32,
    #[arg(long, default_value_t = 1)]
    pub max: u32,
    #[command(flatten)]
    pub autoscaling: AutoscalingArgs,
    /// Keep the spec's scale-to-zero delay, e.g. 15m (not acted upon yet).
    #[arg(long)]
    pub scale_to_zero_after: Option<HumanDuration>,
    /// Wait until `min` replicas are ready; exit non-zero on timeout.
    #[arg(long)]
    pub wait: bool,
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AutoscalingArgs {
    /// What to scale on: requests_in_flight, queue_length or kv_cache_usage.
    #[arg(long, value_parser = parse_metric)]
    pub metric: Option<ScalingMetric>,
    /// The figure one replica should carry.
    #[arg(long)]
    pub target: Option<f64>,
    /// How long lower load must last before replicas are removed, e.g. 5m.
    #[arg(long)]
    pub scale_down_delay: Option<HumanDuration>,
}

impl AutoscalingArgs {
    fn is_empty(&self) -> bool {
        self.metric.is_none() && self.target.is_none() && self.scale_down_delay.is_none()
    }

    fn over(&self, base: Autoscaling) -> Autoscaling {
        Autoscaling {
            metric: self.metric.unwrap_or(base.metric),
            target_per_replica: self.target.unwrap_or(base.target_per_replica),
            scale_down_delay: self.scale_down_delay.unwrap_or(base.scale_down_delay),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct UpdateArgs {
    pub deployment: String,
    /// A new name.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub autoscaling: AutoscalingArgs,
    #[arg(long)]
    pub scale_to_zero_after: Option<HumanDuration>,
    /// New placements, in order (provider/zone/type; repeat the flag): a
    /// rolling update moves the replicas over.
    #[arg(long = "placement", value_parser = parse_placement)]
    pub placements: Vec<Placement>,
}

fn parse_placement(s: &str) -> Result<Placement, String> {
    let parts: Vec<&str> = s.split('/').collect();
    let [provider, zone, instance_type] = parts[..] else {
        return Err(format!(
            "{s:?} is not provider/zone/type, e.g. scaleway/fr-par-2/L4-1-24G"
        ));
    };
    Ok(Placement {
        provider: provider.parse().map_err(|e| format!("{e}"))?,
        zone: zone.to_string(),
        instance_type: instance_type.to_string(),
    })
}

fn parse_metric(s: &str) -> Result<ScalingMetric, String> {
    ScalingMetric::ALL
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| {
            let names: Vec<_> = ScalingMetric::ALL.iter().map(|m| m.as_str()).collect();
            format!("unknown metric {s:?}; use one of {}", names.join(", "))
        })
}

/// The deployment's id: `d-...` as it is, a name looked up among live ones.
async fn resolve(client: &Client, deployment: &str) -> anyhow::Result<DeploymentId> {
    if let Ok(id) = deployment.parse::<DeploymentId>() {
        return Ok(id);
    }
    let list: DeploymentList = client.get("/api/v1/deployments").await?;
    list.deployments
        .iter()
        .find(|d| d.name == deployment)
        .map(|d| d.id)
        .ok_or_else(|| {
            anyhow!(
                "no deployment named {deployment:?}\nhint: list them with `gpufleet deployments list`"
            )
        })
}

pub async fn run(client: &Client, cmd: DeploymentsCommand) -> anyhow::Result<()> {
    match cmd {
        DeploymentsCommand::Create(args) => {
            let body = CreateDeploymentBody {
                project: args.project,
                name: args.name,
                model: args.model,
                placements: args.placements,
                replicas: ReplicaBounds {
                    min: args.min,
                    max: args.max,
                },
                autoscaling: (!args.autoscaling.is_empty())
                    .then(|| args.autoscaling.over(Autoscaling::default())),
                scale_to_zero_after: args.scale_to_zero_after,
                engine_args: None,
            };
            let d: DeploymentView = client.post("/api/v1/deployments", &body).await?;
            let d = if args.wait {
                wait_ready(client, d.id, args.timeout).await?
            } else {
                d
            };
            show(client, &d)
        }
        DeploymentsCommand::List { all } => {
            let path = if all {
                "/api/v1/deployments?include_deleted=true"
            } else {
                "/api/v1/deployments"
            };
            let list: DeploymentList = client.get(path).await?;
            if client.json {
                return print_json(&list);
            }
            if list.deployments.is_empty() {
                println!("no deployments");
            } else {
                println!("{}", render::deployments_table(&list.deployments));
            }
            Ok(())
        }
        DeploymentsCommand::Get { deployment } => {
            let id = resolve(client, &deployment).await?;
            let d: DeploymentView = client.get(&format!("/api/v1/deployments/{id}")).await?;
            show(client, &d)
        }
        DeploymentsCommand::Events { deployment } => {
            let id = resolve(client, &deployment).await?;
            let t: DeploymentTimeline = client
                .get(&format!("/api/v1/deployments/{id}/events?limit=1000"))
                .await?;
            if client.json {
                return print_json(&t);
            }
            println!("{}", render::deployment_timeline_table(&t.events));
            Ok(())
        }
        DeploymentsCommand::Scale {
            deployment,
            replicas,
            min,
            max,
            wait,
            timeout,
        } => {
            let id = resolve(client, &deployment).await?;
            let current: DeploymentView = client.get(&format!("/api/v1/deployments/{id}")).await?;
            let bounds = match (replicas, min, max) {
                (Some(n), _, _) => ReplicaBounds { min: n, max: n },
                (None, None, None) => {
                    bail!("nothing to change\nhint: pass --replicas N, or --min and/or --max")
                }
                (None, min, max) => ReplicaBounds {
                    min: min.unwrap_or(current.replicas.min),
                    max: max.unwrap_or(current.replicas.max),
                },
            };
            let body = PatchDeploymentBody {
                replicas: Some(bounds),
                ..Default::default()
            };
            let d = patch(client, id, &body).await?;
            let d = if wait {
                wait_ready(client, d.id, timeout).await?
            } else {
                d
            };
            show(client, &d)
        }
        DeploymentsCommand::Update(args) => {
            let id = resolve(client, &args.deployment).await?;
            if args.name.is_none()
                && args.autoscaling.is_empty()
                && args.scale_to_zero_after.is_none()
                && args.placements.is_empty()
            {
                bail!("nothing to change\nhint: pass --name, --metric, --target, --scale-down-delay, --scale-to-zero-after or --placement (replicas: `gpufleet deployments scale`)");
            }
            let autoscaling = if args.autoscaling.is_empty() {
                None
            } else {
                let current: DeploymentView =
                    client.get(&format!("/api/v1/deployments/{id}")).await?;
                Some(args.autoscaling.over(current.autoscaling))
            };
            let body = PatchDeploymentBody {
                name: args.name,
                autoscaling,
                scale_to_zero_after: args.scale_to_zero_after,
                placements: (!args.placements.is_empty()).then_some(args.placements),
                ..Default::default()
            };
            let d = patch(client, id, &body).await?;
            show(client, &d)
        }
        DeploymentsCommand::Delete {
            deployment,
            wait,
            timeout,
        } => {
            let id = resolve(client, &deployment).await?;
            let d: DeploymentView = client
                .send(client.request(Method::DELETE, &format!("/api/v1/deployments/{id}")))
                .await?;
            let d = if wait {
                wait_until(client, id, timeout, "deleted", |d| {
                    d.state == DeploymentState::Deleted
                })
                .await?
            } else {
                d
            };
            if client.json {
                return print_json(&d);
            }
            println!("{}: {} ({})", d.id, d.state, d.status.summary);
            Ok(())
        }
    }
}

async fn patch(
    client: &Client,
    id: DeploymentId,
    body: &PatchDeploymentBody,
) -> anyhow::Result<DeploymentView> {
    client
        .send(
            client
                .request(Method::PATCH, &format!("/api/v1/deployments/{id}"))
                .json(body),
        )
        .await
}

fn show(client: &Client, d: &DeploymentView) -> anyhow::Result<()> {
    if client.json {
        return print_json(d);
    }
    print!("{}", render::deployment_details(d));
    Ok(())
}

/// Until at least `min` replicas are ready and as many as desired.
async fn wait_ready(
    client: &Client,
    id: DeploymentId,
    timeout: Duration,
) -> anyhow::Result<DeploymentView> {
    wait_until(client, id, timeout, "ready", |d| {
        d.status.ready >= d.replicas.min.max(1).min(d.replicas.max)
            && d.status.ready >= d.status.desired
    })
    .await
}

async fn wait_until(
    client: &Client,
    id: DeploymentId,
    timeout: Duration,
    what: &str,
    done: impl Fn(&DeploymentView) -> bool,
) -> anyhow::Result<DeploymentView> {
    let deadline = Instant::now() + timeout;
    let mut last_summary = String::new();
    loop {
        let d: DeploymentView = client.get(&format!("/api/v1/deployments/{id}")).await?;
        if done(&d) {
            return Ok(d);
        }
        if !client.json && d.status.summary != last_summary && !d.status.summary.is_empty() {
            eprintln!("{}: {}", d.name, d.status.summary);
            last_summary = d.status.summary.clone();
        }
        if Instant::now() >= deadline {
            bail!(
                "deployment {id} not {what} after {:?}: {}\nhint: see why with `gpufleet deployments events {id}`",
                timeout,
                d.status.summary
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
