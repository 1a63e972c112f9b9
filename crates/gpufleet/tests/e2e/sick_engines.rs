//! Routing that never waits on a sick engine, against `gpufleet up` with
//! Mock instances running the simulator: a failing and a stalling instance
//! cost the clients (almost) nothing; a stream whose engine is killed or
//! stalls mid-way completes on another instance with exactly the text it
//! would have had; hedged requests are won by the fast instance and counted
//! once. Every event shows on the instances' timelines and on `/metrics`.

use super::router::{create_key, openai, served_by, usage_of, wait_usage};
use crate::common::*;
use async_openai::types::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
    CreateChatCompletionRequestArgs,
};
use futures::StreamExt;
use gpufleet_domain::{InstanceId, InstanceStatus as S};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Fast revocation and usage flushes; everything else at the product's
/// defaults (peak-EWMA choice, stall detection with a 1 s floor, 5 s
/// breaker cool-down, stream failover on).
const BASE_TOML: &str = r#"
[router]
api_key_cache_ttl_ms = 200
usage_flush_interval_ms = 200
"#;

async fn spawn(extra: &str) -> TestApp {
    spawn_with_control(extra, "").await
}

async fn spawn_with_control(extra: &str, control: &str) -> TestApp {
    TestApp::spawn_with(
        BIN,
        Options {
            extra_toml: format!("{BASE_TOML}{extra}"),
            control_toml: control.to_string(),
            ..Default::default()
        },
    )
    .await
}

async fn ready(app: &TestApp, n: u32) -> Vec<(InstanceId, IpAddr)> {
    let ids: Vec<InstanceId> = app.create(n).await.iter().map(|v| v.id).collect();
    let mut v: Vec<(InstanceId, IpAddr)> = app
        .wait_status(&ids, S::Ready, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|v| (v.id, v.ip.expect("ready with an IP")))
        .collect();
    v.sort();
    v
}

/// Change an engine's simulator knobs.
async fn knobs(app: &TestApp, ip: IpAddr, patch: Value) {
    let resp = app
        .http
        .patch(format!("http://{ip}:{ENGINE_PORT}/admin/config"))
        .json(&patch)
        .send()
        .await
        .expect("engine admin");
    assert_eq!(resp.status(), StatusCode::OK, "{patch}");
}

/// Entries of `action` on the instance's timeline.
async fn entries(app: &TestApp, id: InstanceId, action: &str) -> Vec<serde_json::Value> {
    let tl = app.timeline(id).await.expect("timeline");
    tl.events
        .into_iter()
        .filter(|e| e.action == action)
        .map(|e| serde_json::to_value(e).unwrap())
        .collect()
}

async fn wait_entry(app: &TestApp, id: InstanceId, action: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(e) = entries(app, id, action).await.pop() {
            return e;
        }
        assert!(Instant::now() < deadline, "no {action} on {id}'s timeline");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One streamed chat request through the router, read to its end: the
/// instance that answered first, the text, and how long it all took.
async fn streamed(app: &TestApp, key: &str, body: &Value) -> (InstanceId, String, Duration) {
    let t = Instant::now();
    let resp = app
        .http
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("router answers");
    assert_eq!(resp.status(), StatusCode::OK);
    let by = served_by(&resp);
    let raw = resp.text().await.expect("the whole stream");
    (by, content_of(&raw), t.elapsed())
}

/// The text of an SSE chat stream, checking it ends properly.
fn content_of(raw: &str) -> String {
    let data: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "a complete stream: {raw}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).expect("a JSON chunk"))
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_and_a_stalling_instance_cost_at_most_one_slow_request() {
    // The agents' canary notices the stall too (the instance turns
    // unhealthy) and the recovery (ready again), at a test's pace.
    let app = spawn_with_control("", "canary_interval_ms = 2000\ncanary_timeout_ms = 1000\n").await;
    let (_, key) = create_key(&app, "sick", None).await;
    let instances = ready(&app, 3).await;
    let (failing, stalling, healthy) = (instances[0], instances[1], instances[2]);
    for (_, ip) in &instances {
        knobs(&app, *ip, json!({"ttft_ms": 30.0, "itl_ms": 5.0})).await;
    }
    knobs(
        &app,
        failing.1,
        json!({"failure_rate": 1.0, "failure_kinds": ["server_error"]}),
    )
    .await;
    let stall_began = chrono::Utc::now();
    knobs(
        &app,
        stalling.1,
        json!({"failure_rate": 1.0, "failure_kinds": ["stall"], "stall_ms": 20000}),
    )
    .await;

    // 96 requests from 8 clients: half of them streamed, half whole.
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hello there"}]});
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let mut body = body.clone();
            let whole = c % 2 == 1;
            if whole {
                body["stream"] = false.into();
            }
            let (base, http, key) = (
                app.url("/v1/chat/completions"),
                app.http.clone(),
                key.clone(),
            );
            tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..12 {
                    let t = Instant::now();
                    let resp = http
                        .post(&base)
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await
                        .expect("router answers");
                    assert_eq!(resp.status(), StatusCode::OK);
                    let by = served_by(&resp);
                    let text = if whole {
                        let v: Value = resp.json().await.unwrap();
                        assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
                        v["choices"][0]["message"]["content"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    } else {
                        content_of(&resp.text().await.unwrap())
                    };
                    assert_eq!(text.split_whitespace().count(), 8);
                    times.push((t.elapsed(), by));
                }
                times
            })
        })
        .collect();
    let mut times = Vec::new();
    for c in clients {
        times.extend(c.await.expect("client"));
    }
    assert_eq!(times.len(), 96);
    let mut latencies: Vec<Duration> = times.iter().map(|t| t.0).collect();
    latencies.sort();
    let slow = latencies
        .iter()
        .filter(|d| **d > Duration::from_secs(2))
        .count();
    println!(
        "scenario: p50 {:?}, p99 {:?}, max {:?}, over 2 s: {slow}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[95]
    );
    assert!(
        slow <= 1,
        "{slow} requests waited more than 2 s: {latencies:?}"
    );
    assert!(
        times.iter().all(|(_, by)| *by == healthy.0),
        "every answer came from the healthy instance"
    );

    // The stalled instance left the router's choice within 5 s, with the
    // reason on its timeline; the failing one too.
    let ejected = wait_entry(&app, stalling.0, "router.ejected").await;
    let at: chrono::DateTime<chrono::Utc> = ejected["at"].as_str().unwrap().parse().unwrap();
    assert!(
        at - stall_began <= chrono::TimeDelta::seconds(5),
        "ejected {} after the stall began",
        at - stall_began
    );
    assert!(
        ejected["message"]
            .as_str()
            .unwrap()
            .contains("no first token"),
        "{ejected}"
    );
    wait_entry(&app, stalling.0, "router.stall").await;
    wait_entry(&app, failing.0, "router.ejected").await;
    let report = wait_usage(&app, "stalls and ejections", |v| {
        usage_of(v, "instances", &stalling.0.to_string())
            .is_some_and(|u| u["stalls"].as_u64() >= Some(1) && u["ejections"].as_u64() >= Some(1))
    })
    .await;
    assert!(
        usage_of(&report, "instances", &failing.0.to_string())
            .is_some_and(|u| u["ejections"].as_u64() >= Some(1)),
        "{report}"
    );
    let metrics = app
        .req(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "gpufleet_router_instance_stalls_total{{instance_id=\"{}\"",
            stalling.0
        )),
        "stalls on /metrics"
    );
    assert!(metrics.contains("gpufleet_router_instance_ejections_total"));

    // The stalled instance recovers: it is routed to again within 10 s.
    knobs(&app, stalling.1, json!({"failure_rate": 0.0})).await;
    let recovered = Instant::now();
    loop {
        let (by, _, took) = streamed(&app, &key, &body).await;
        assert!(took < Duration::from_secs(3), "a request took {took:?}");
        if by == stalling.0 {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(10),
            "the recovered instance got no request within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("back in {:?}", recovered.elapsed());
    wait_entry(&app, stalling.0, "router.readmitted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_whose_engine_dies_or_stalls_completes_elsewhere() {
    // The canary would take the stalling instance out of the pool (its
    // one-token check stalls too); here the router alone is under test.
    let app = spawn_with_control("", "canary_interval_ms = 0\n").await;
    let (key_id, key) = create_key(&app, "failover", None).await;
    let instances = ready(&app, 2).await;
    for (_, ip) in &instances {
        knobs(&app, *ip, json!({"itl_ms": 10.0})).await;
    }
    let ip_of: HashMap<InstanceId, IpAddr> = instances.iter().copied().collect();
    let prompt = "tell me about the fleet";
    // What the uncut answer is: the simulator's text is a function of the
    // seed and the position, the same on every engine.
    let reference = |seed: u64, n: u32| {
        let http = app.http.clone();
        let ip = instances[0].1;
        async move {
            let v: Value = http
                .post(format!("http://{ip}:{ENGINE_PORT}/v1/chat/completions"))
                .json(&json!({"model": MODEL, "seed": seed, "max_tokens": n,
                              "messages": [{"role": "user", "content": prompt}]}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };

    // 1. SIGKILL the engine in the middle of an official client's stream.
    let want = reference(42, 300).await;
    let client = openai(&app, &key);
    let req = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_tokens(300u32)
        .seed(42)
        .stream(true)
        .stream_options(ChatCompletionStreamOptions {
            include_usage: true,
        })
        .messages(vec![ChatCompletionRequestUserMessageArgs::default()
            .content(prompt)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let mut stream = client.chat().create_stream(req).await.expect("stream");
    let mut text = String::new();
    let mut usage = None;
    let mut killed = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("no error reaches the client");
        if let Some(u) = chunk.usage {
            usage = Some(u);
        }
        for c in &chunk.choices {
            if let Some(t) = &c.delta.content {
                text.push_str(t);
            }
        }
        if killed.is_none() && text.split_whitespace().count() >= 40 {
            // The engine serving it is the one with a request running.
            let mut serving = None;
            for (id, ip) in &instances {
                if super::router::engine_metric(&app, *ip, "vllm:num_requests_running").await >= 1.0
                {
                    serving = Some(*id);
                }
            }
            let victim = serving.expect("an engine runs the stream");
            for pid in engine_pids(ip_of[&victim]) {
                kill9(pid);
            }
            killed = Some(victim);
        }
    }
    let victim = killed.expect("the stream was long enough to kill its engine");
    assert_eq!(text, want, "no repeated or lost text");
    assert_eq!(text.split_whitespace().count(), 300);
    let usage = usage.expect("the usage chunk");
    assert_eq!(usage.completion_tokens, 300);
    assert_eq!(usage.prompt_tokens, 5);
    let entry = wait_entry(&app, victim, "router.stream_failover").await;
    assert!(
        entry["message"].as_str().unwrap().contains("continued on"),
        "{entry}"
    );
    // Usage is counted once, for the key: 300 completion tokens.
    wait_usage(&app, "the key's usage", |v| {
        usage_of(v, "keys", &key_id).is_some_and(|u| u["completion_tokens"].as_u64() == Some(300))
    })
    .await;

    // 2. An engine that stalls in the middle of its streams: every stream
    // it starts is continued elsewhere, long before its 30 s stall ends.
    app.wait_status(&[victim], S::Ready, Duration::from_secs(60))
        .await;
    // The uncut answer, asked before any engine stalls.
    let want = reference(7, 60).await;
    // The other instance (the victim's figures are the worse ones now, so
    // the latency-aware choice prefers this one).
    let staller = instances
        .iter()
        .map(|(id, _)| *id)
        .find(|id| *id != victim)
        .unwrap();
    knobs(
        &app,
        ip_of[&staller],
        json!({"failure_rate": 1.0, "failure_kinds": ["stall_mid_stream"], "stall_ms": 30000}),
    )
    .await;
    // And the victim slow to its first token, so that the latency-aware
    // choice turns to the staller as soon as it has seen one slow answer
    // (the staller's stall comes after its first token, which is fast):
    // without it, on a loaded machine, the two figures could keep the
    // victim cheaper for every try.
    knobs(&app, ip_of[&victim], json!({"ttft_ms": 400.0})).await;
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 60, "seed": 7,
                      "messages": [{"role": "user", "content": prompt}]});
    let mut started_on_staller = 0;
    for _ in 0..24 {
        let (by, got, took) = streamed(&app, &key, &body).await;
        assert_eq!(got, want, "no repeated or lost text");
        assert!(took < Duration::from_secs(10), "{took:?}");
        if by == staller {
            started_on_staller += 1;
        }
        if started_on_staller > 0 {
            break;
        }
    }
    assert!(
        started_on_staller > 0,
        "no stream started on the stalling instance"
    );
    wait_entry(&app, staller, "router.stream_failover").await;
    let report = wait_usage(&app, "failovers", |v| {
        usage_of(v, "instances", &staller.to_string())
            .is_some_and(|u| u["failovers"].as_u64() >= Some(1))
    })
    .await;
    assert!(usage_of(&report, "instances", &victim.to_string())
        .is_some_and(|u| u["failovers"].as_u64() >= Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hedged_request_is_won_by_the_fast_instance_and_counted_once() {
    // Stall detection is kept out of the way (a 20 s floor): the slow
    // instance is slow, not stalled, and only hedging saves the wait.
    let app = spawn(&format!(
        "policy = \"round_robin\"\nstall_floor_ms = 20000\nhedge_models = [\"{MODEL}\"]\nhedge_min_delay_ms = 100\n"
    ))
    .await;
    let (key_id, key) = create_key(&app, "hedge", None).await;
    let instances = ready(&app, 2).await;
    let (slow, fast) = (instances[0], instances[1]);
    knobs(&app, slow.1, json!({"ttft_ms": 3000.0})).await;
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 5,
                      "messages": [{"role": "user", "content": "quick"}]});
    for i in 0..10 {
        let (by, text, took) = streamed(&app, &key, &body).await;
        assert_eq!(text.split_whitespace().count(), 5);
        assert_eq!(by, fast.0, "request {i}: the fast instance answers");
        assert!(
            took < Duration::from_millis(2500),
            "request {i} waited {took:?} for the slow instance"
        );
    }
    let report = wait_usage(&app, "hedges and the key's usage", |v| {
        usage_of(v, "instances", &fast.0.to_string())
            .is_some_and(|u| u["hedges"].as_u64() >= Some(1))
            && usage_of(v, "keys", &key_id)
                .is_some_and(|u| u["completion_tokens"].as_u64() >= Some(50))
    })
    .await;
    // Counted once: 10 requests of 5 tokens, whatever was sent twice.
    let k = usage_of(&report, "keys", &key_id).unwrap();
    assert_eq!(k["completion_tokens"], 50, "{report}");
    assert_eq!(k["requests"], 10, "{report}");
    assert_eq!(
        usage_of(&report, "instances", &slow.0.to_string())
            .map(|u| u["completion_tokens"].as_u64()),
        Some(Some(0)),
        "the cancelled copies produced nothing that was counted"
    );
    let entry = wait_entry(&app, fast.0, "router.hedge").await;
    assert_eq!(entry["metadata"]["winner"], fast.0.to_string());
}
