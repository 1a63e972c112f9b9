//! The simulator's knobs over real HTTP: `GET/PATCH /admin/config`, failure
//! injection, the waiting-queue limit, echo mode, load time and histograms.

use std::time::Duration;

use gpufleet_sim::{SimArgs, SimServer};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

struct Sim {
    base: String,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Sim {
    async fn start(args: SimArgs) -> Self {
        let server = SimServer::bind(args).await.expect("bind");
        let base = format!("http://{}", server.local_addr());
        let (tx, rx) = oneshot::channel();
        tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Self {
            base,
            http: reqwest::Client::new(),
            _stop: tx,
        }
    }

    async fn patch(&self, body: Value) -> reqwest::Response {
        self.http
            .patch(format!("{}/admin/config", self.base))
            .json(&body)
            .send()
            .await
            .expect("patch")
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("post")
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn knobs_are_read_and_changed_at_run_time() {
    let sim = Sim::start(SimArgs::for_tests("m")).await;
    let k: Value = sim
        .http
        .get(format!("{}/admin/config", sim.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(k["itl_ms"], 5.0);
    assert_eq!(k["mode"], "random");
    let resp = sim
        .patch(json!({"itl_ms": 0, "ttft_ms": 1, "mode": "echo"}))
        .await;
    assert_eq!(resp.status(), 200);
    let k: Value = resp.json().await.unwrap();
    assert_eq!(
        (k["itl_ms"].as_f64(), k["mode"].as_str()),
        (Some(0.0), Some("echo"))
    );
    // Invalid values are refused and change nothing.
    let resp = sim.patch(json!({"max_num_seqs": 0})).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "max_num_seqs");
    assert_eq!(sim.patch(json!({"bogus": 1})).await.status(), 400);
}

#[tokio::test]
async fn echo_mode_and_correct_usage() {
    let mut args = SimArgs::for_tests("m");
    args.mode = gpufleet_sim::knobs::TextMode::Echo;
    args.itl_ms = 0;
    let sim = Sim::start(args).await;
    let v: Value = sim
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "alpha beta gamma", "max_tokens": 10}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["text"], "alpha beta gamma");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    let v: Value = sim
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "one two three"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "one two");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Streamed with usage: the counts are what was produced.
    let text = sim
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "a b", "max_tokens": 9, "stream": true,
                   "stream_options": {"include_usage": true}}),
        )
        .await
        .text()
        .await
        .unwrap();
    let usage: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["usage"].is_object())
        .collect();
    assert_eq!(usage.len(), 1, "{text}");
    assert_eq!(usage[0]["usage"]["completion_tokens"], 2);
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    let m = sim.metrics().await;
    assert_eq!(
        metric(
            &m,
            "vllm:request_success_total{model_name=\"m\",finished_reason=\"stop\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "vllm:request_success_total{model_name=\"m\",finished_reason=\"length\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn failures_are_injected() {
    let sim = Sim::start(SimArgs::for_tests("m")).await;
    let body = json!({"model": "m", "prompt": "x", "max_tokens": 1});
    sim.patch(json!({"failure_rate": 1.0, "failure_kinds": ["server_error"]}))
        .await;
    let r = sim.post("/v1/completions", body.clone()).await;
    assert_eq!(r.status(), 500);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "server_error");
    sim.patch(json!({"failure_kinds": ["rate_limit"]})).await;
    assert_eq!(
        sim.post("/v1/completions", body.clone()).await.status(),
        429
    );
    // A stall holds the answer back.
    sim.patch(json!({"failure_kinds": ["stall"], "stall_ms": 300}))
        .await;
    let t = Instant::now();
    assert_eq!(
        sim.post("/v1/completions", body.clone()).await.status(),
        200
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
    sim.patch(json!({"failure_rate": 0.0})).await;
    assert_eq!(sim.post("/v1/completions", body).await.status(), 200);
    let m = sim.metrics().await;
    assert_eq!(metric(&m, "gpufleet_sim:injected_failures_total"), 3.0);
}

#[tokio::test]
async fn a_full_waiting_queue_answers_429() {
    let mut args = SimArgs::for_tests("m");
    args.max_num_seqs = 1;
    args.max_waiting = 1;
    args.itl_ms = 20;
    let sim = Sim::start(args).await;
    let long = json!({"model": "m", "prompt": "x", "max_tokens": 50});
    let running = tokio::spawn({
        let sim_base = sim.base.clone();
        let long = long.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{sim_base}/v1/completions"))
                .json(&long)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    // Wait until one runs and one waits.
    let deadline = Instant::now() + Duration::from_secs(5);
    let waiter = tokio::spawn({
        let sim_base = sim.base.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            reqwest::Client::new()
                .post(format!("{sim_base}/v1/completions"))
                .json(&json!({"model": "m", "prompt": "x", "max_tokens": 1}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    loop {
        let m = sim.metrics().await;
        if metric(&m, "vllm:num_requests_running") == 1.0
            && metric(&m, "vllm:num_requests_waiting") == 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never one running and one waiting: {m}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = sim
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "max_tokens": 1}),
        )
        .await;
    assert_eq!(r.status(), 429, "queue of 1 is full");
    assert_eq!(running.await.unwrap(), 200);
    assert_eq!(waiter.await.unwrap(), 200);
}

#[tokio::test]
async fn reload_and_latency_histograms() {
    let mut args = SimArgs::for_tests("m");
    args.ttft_ms = 20;
    args.itl_ms = 10;
    let sim = Sim::start(args).await;
    let r = sim
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "max_tokens": 3}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let m = sim.metrics().await;
    for name in [
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
    ] {
        assert_eq!(metric(&m, name), 1.0, "{name}");
    }
    assert_eq!(metric(&m, "vllm:inter_token_latency_seconds_count"), 2.0);
    assert!(metric(&m, "vllm:time_to_first_token_seconds_sum") >= 0.02);
    assert_eq!(
        metric(
            &m,
            "vllm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"0.01\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "vllm:time_to_first_token_seconds_bucket{model_name=\"m\",le=\"+Inf\"}"
        ),
        1.0
    );
    // A new load time: not ready until it has passed.
    sim.patch(json!({"model_load_delay_ms": 400})).await;
    let health = format!("{}/health", sim.base);
    assert_eq!(sim.http.get(&health).send().await.unwrap().status(), 503);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.http.get(&health).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "never loaded again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
