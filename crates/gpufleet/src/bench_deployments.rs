//! `gpufleet bench deployments`: the three figures of deployments, against a
//! `gpufleet up` child with the Mock provider on this machine.
//!
//! 1. **Scale from zero**: a deployment idle past `scale_to_zero_after`
//!    drains to no replica; a streamed request then waits for a replica.
//!    Reported: its time to first token minus the replica's own boot time
//!    (instance created → ready), i.e. what the router and the keeper add.
//! 2. **Autoscaler reaction**: a step from no load to 16 concurrent streams
//!    on one replica (target 4 in flight per replica): time from the step
//!    to the keeper's scale-up decision and to the new replica being
//!    requested (its instance created).
//! 3. **Rolling update under paced load**: `--rate` whole requests per
//!    second; p50/p99 and failures while steady, then while the deployment
//!    moves to another zone.

use crate::bench_router::{start_up, Setup};
use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct DeploymentsBenchArgs {
    /// Scale-from-zero cycles.
    #[arg(long, default_value_t = 3)]
    pub cycles: usize,
    /// Requests per second of the rolling-update load.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Seconds of steady load before the rolling update.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
    key: String,
}

impl Api {
    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status}: {v}");
        }
        Ok(v)
    }

    async fn create(&self, body: Value) -> anyhow::Result<String> {
        let v = self
            .json(reqwest::Method::POST, "/api/v1/deployments", Some(body))
            .await?;
        Ok(v["id"].as_str().context("deployment id")?.to_string())
    }

    async fn get(&self, id: &str) -> anyhow::Result<Value> {
        self.json(
            reqwest::Method::GET,
            &format!("/api/v1/deployments/{id}"),
            None,
        )
        .await
    }

    /// Poll the deployment until `cond` holds.
    async fn wait(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let d = self.get(id).await?;
            if cond(&d) {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("{what} did not happen within {timeout:?}: {}", d["status"]);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn instances(d: &Value) -> Vec<Value> {
    d["instances"].as_array().cloned().unwrap_or_default()
}

fn ready(d: &Value) -> Vec<Value> {
    instances(d)
        .into_iter()
        .filter(|i| i["status"] == "ready")
        .collect()
}

fn live(d: &Value) -> usize {
    instances(d)
        .iter()
        .filter(|i| {
            !matches!(
                i["status"].as_str(),
                Some("terminated" | "archived" | "failed")
            )
        })
        .count()
}

fn time(v: &Value) -> Option<DateTime<Utc>> {
    v.as_str()?.parse().ok()
}

fn spec(name: &str, min: u32, max: u32, zone: &str, extra: Value) -> Value {
    let mut v = json!({
        "name": name,
        "model": "gpufleet/sim-small",
        "placements": [{"provider": "mock", "zone": zone, "instance_type": "mock-l4-1"}],
        "replicas": {"min": min, "max": max},
        "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 4, "scale_down_delay": "5m"}
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

/// Time to the first token of a streamed chat request through the router.
async fn first_token(api: &Api, max_tokens: u32) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let resp = api
        .http
        .post(format!("{}/v1/chat/completions", api.base))
        .bearer_auth(&api.key)
        .json(
            &json!({"model": "gpufleet/sim-small", "stream": true, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": "hello"}]}),
        )
        .timeout(Duration::from_secs(300))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut body = resp.bytes_stream();
    let mut seen = Vec::new();
    while let Some(chunk) = body.next().await {
        seen.extend_from_slice(&chunk?);
        if seen.windows(11).any(|w| w == b"\"content\":\"") && seen.windows(2).any(|w| w == b"\n\n")
        {
            let text = String::from_utf8_lossy(&seen);
            if text.lines().any(|l| {
                l.starts_with("data: {")
                    && serde_json::from_str::<Value>(&l[6..]).is_ok_and(|v| {
                        v["choices"][0]["delta"]["content"]
                            .as_str()
                            .is_some_and(|c| !c.is_empty())
                    })
            }) {
                return Ok(t.elapsed());
            }
        }
    }
    bail!("the stream ended without a token")
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Whole requests at `rate` per second until `stop`: (latency, ok) each.
fn paced(
    api: &Arc<Api>,
    rate: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Arc<Mutex<Vec<(Instant, Duration, bool)>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let (api, sink) = (api.clone(), out.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            let (api, sink) = (api.clone(), sink.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let ok = match api
                    .http
                    .post(format!("{}/v1/chat/completions", api.base))
                    .bearer_auth(&api.key)
                    .json(&json!({"model": "gpufleet/sim-small", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": "hello"}]}))
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((t, t.elapsed(), ok));
            });
        }
    });
    out
}

fn summary(rows: &[(Instant, Duration, bool)]) -> String {
    let mut lat: Vec<Duration> = rows.iter().map(|r| r.1).collect();
    lat.sort();
    let failed = rows.iter().filter(|r| !r.2).count();
    format!(
        "{} requests, p50 {:.2} ms, p99 {:.2} ms, failed {failed}",
        rows.len(),
        pct(&lat, 0.5).as_secs_f64() * 1000.0,
        pct(&lat, 0.99).as_secs_f64() * 1000.0
    )
}

pub async fn run(args: DeploymentsBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this program")?;
    let dir = std::env::temp_dir().join(format!("gpufleet-bench-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut setup = Setup {
        machines: vec![],
        dir: dir.clone(),
        ups: vec![],
        nginx: None,
    };
    let up = start_up(&mut setup, &exe, &dir.join("up0"), 0, &json!({})).await?;
    let api = Arc::new(Api {
        http: reqwest::Client::new(),
        base: format!("http://{}", up.addr),
        token: up.token.clone(),
        key: up.key.clone(),
    });

    // 1. Scale from zero.
    let id = api
        .create(spec(
            "zero",
            1,
            1,
            "local-1",
            json!({"scale_to_zero_after": "2s"}),
        ))
        .await?;
    api.wait(&id, "a first replica", Duration::from_secs(60), |d| {
        ready(d).len() == 1
    })
    .await?;
    let mut overheads = Vec::new();
    for cycle in 0..args.cycles.max(1) {
        api.wait(&id, "scale to zero", Duration::from_secs(60), |d| {
            d["status"]["desired"] == 0 && live(d) == 0
        })
        .await?;
        let ttft = first_token(&api, 1).await?;
        let d = api.get(&id).await?;
        let r = ready(&d);
        let inst = r.first().context("a ready replica")?;
        let boot = (time(&inst["ready_at"]).context("ready_at")?
            - time(&inst["created_at"]).context("created_at")?)
        .to_std()
        .unwrap_or_default();
        let overhead = ttft.saturating_sub(boot);
        println!(
            "scale from zero, cycle {}: first token after {:.1} ms; the replica booted in {:.1} ms; added {:.1} ms",
            cycle + 1,
            ttft.as_secs_f64() * 1000.0,
            boot.as_secs_f64() * 1000.0,
            overhead.as_secs_f64() * 1000.0
        );
        overheads.push(overhead);
    }
    overheads.sort();
    api.json(
        reqwest::Method::DELETE,
        &format!("/api/v1/deployments/{id}"),
        None,
    )
    .await?;

    // 2. Autoscaler reaction.
    let id = api.create(spec("auto", 1, 3, "local-1", json!({}))).await?;
    let d = api
        .wait(&id, "one replica", Duration::from_secs(60), |d| {
            ready(d).len() == 1
        })
        .await?;
    let first = ready(&d)[0]["id"].as_str().unwrap_or_default().to_string();
    let ip = ready(&d)[0]["ip"].as_str().context("ip")?.to_string();
    // Long streams, so requests stay in flight.
    api.http
        .patch(format!(
            "http://{ip}:{}/admin/config",
            gpufleet_proto::DEFAULT_ENGINE_PORT
        ))
        .json(&json!({"itl_ms": 20.0}))
        .send()
        .await?
        .error_for_status()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let step = Utc::now();
    let t0 = Instant::now();
    for _ in 0..16 {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = first_token(&api, 400).await;
            }
        });
    }
    let d = api
        .wait(
            &id,
            "a new replica requested",
            Duration::from_secs(30),
            |d| instances(d).iter().any(|i| i["id"] != first.as_str()),
        )
        .await?;
    let seen = t0.elapsed();
    let created = instances(&d)
        .iter()
        .filter(|i| i["id"] != first.as_str())
        .filter_map(|i| time(&i["created_at"]))
        .min()
        .context("created_at")?;
    let events = api
        .json(
            reqwest::Method::GET,
            &format!("/api/v1/deployments/{id}/events"),
            None,
        )
        .await?;
    let decided = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["metadata"]["reason"] == "scale_up")
        .filter_map(|e| time(&e["at"]))
        .min();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ms = |t: DateTime<Utc>| (t - step).num_milliseconds();
    println!(
        "autoscaler: step at 0; scale-up decided at {} ms; new replica requested (instance created) at {} ms; seen by this client at {:.0} ms",
        decided.map_or("?".to_string(), |t| ms(t).to_string()),
        ms(created),
        seen.as_secs_f64() * 1000.0
    );
    api.json(
        reqwest::Method::DELETE,
        &format!("/api/v1/deployments/{id}"),
        None,
    )
    .await?;

    // 3. Rolling update under paced load.
    let id = api.create(spec("roll", 2, 2, "local-1", json!({}))).await?;
    api.wait(&id, "two replicas", Duration::from_secs(60), |d| {
        ready(d).len() == 2
    })
    .await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rows = paced(&api, args.rate, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let steady_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs.max(1))).await;
    let update_from = Instant::now();
    api.json(
        reqwest::Method::PATCH,
        &format!("/api/v1/deployments/{id}"),
        Some(json!({"placements": [{"provider": "mock", "zone": "local-2", "instance_type": "mock-l4-1"}]})),
    )
    .await?;
    api.wait(&id, "the rolling update", Duration::from_secs(120), |d| {
        let r = ready(d);
        r.len() == 2 && r.iter().all(|i| i["zone"] == "local-2") && live(d) == 2
    })
    .await?;
    let update_to = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = rows.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let steady: Vec<_> = all
        .iter()
        .copied()
        .filter(|r| r.0 >= steady_from && r.0 < update_from)
        .collect();
    let during: Vec<_> = all
        .iter()
        .copied()
        .filter(|r| r.0 >= update_from && r.0 <= update_to)
        .collect();
    println!(
        "scale from zero: added {:.1} ms median, {:.1} ms max over {} cycles",
        pct(&overheads, 0.5).as_secs_f64() * 1000.0,
        overheads.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        overheads.len()
    );
    println!(
        "rolling update at {} req/s: steady {}; during the update ({:.1} s) {}",
        args.rate,
        summary(&steady),
        (update_to - update_from).as_secs_f64(),
        summary(&during)
    );
    drop(setup);
    Ok(())
}
