//! The simulator over real HTTP on 127.0.0.1:0.

use std::time::Duration;

use futures::StreamExt;
use gpufleet_sim::{SimArgs, SimServer};
use gpufleet_test_support::wait::wait_until;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

struct Sim {
    base: String,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), gpufleet_sim::SimError>>,
}

impl Sim {
    async fn start(args: SimArgs) -> Self {
        let server = SimServer::bind(args).await.expect("bind");
        let base = format!("http://{}", server.local_addr());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Self {
            base,
            http: reqwest::Client::new(),
            stop: Some(tx),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("send")
    }

    async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .to_string();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        resp.text().await.expect("body")
    }

    async fn gauge(&self, name: &str) -> f64 {
        metric(&self.metrics().await, name)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops in time")
            .expect("join")
            .expect("clean exit");
    }
}

/// Value of the first sample of `name` (labels ignored).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample of {name} in\n{text}"))
}

fn args(model: &str) -> SimArgs {
    SimArgs {
        itl_ms: 0,
        ..SimArgs::for_tests(model)
    }
}

#[tokio::test]
async fn not_ready_until_the_model_is_loaded() {
    let started = Instant::now();
    let sim = Sim::start(SimArgs {
        model_load_delay_ms: 400,
        ..args("org/loading-model")
    })
    .await;
    let health = sim
        .http
        .get(sim.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 503);
    let models = sim
        .http
        .get(sim.url("/v1/models"))
        .send()
        .await
        .expect("models");
    assert_eq!(models.status(), 503);
    let early = sim
        .post(
            "/v1/completions",
            json!({"model": "org/loading-model", "prompt": "hi"}),
        )
        .await;
    assert_eq!(early.status(), 503);

    wait_until("health 200", Duration::from_secs(10), || async {
        sim.http
            .get(sim.url("/health"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(400));

    let models: Value = sim
        .http
        .get(sim.url("/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().expect("data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], "org/loading-model");
    assert_eq!(data[0]["object"], "model");
    sim.stop().await;
}

#[tokio::test]
async fn completions_honour_max_tokens_and_count_usage() {
    let sim = Sim::start(args("m")).await;
    let resp = sim
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "one two  three", "max_tokens": 7}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(v["model"], "m");
    let text = v["choices"][0]["text"].as_str().expect("text");
    assert_eq!(text.split_whitespace().count(), 7);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10})
    );

    let chat = sim
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}]}),
        )
        .await;
    assert_eq!(chat.status(), 200);
    let v: Value = chat.json().await.expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(content.split_whitespace().count(), 16, "default max_tokens");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18})
    );

    let metrics = sim.metrics().await;
    assert_eq!(metric(&metrics, "vllm:prompt_tokens_total"), 5.0);
    assert_eq!(metric(&metrics, "vllm:generation_tokens_total"), 23.0);
    sim.stop().await;
}

#[tokio::test]
async fn same_seed_gives_same_text() {
    let body = json!({"model": "m", "prompt": "x", "max_tokens": 12});
    let mut texts = Vec::new();
    for _ in 0..2 {
        let sim = Sim::start(SimArgs {
            seed: 42,
            ..args("m")
        })
        .await;
        let v: Value = sim
            .post("/v1/completions", body.clone())
            .await
            .json()
            .await
            .expect("json");
        texts.push(v["choices"][0]["text"].as_str().expect("text").to_string());
        sim.stop().await;
    }
    assert_eq!(texts[0], texts[1]);
}

fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

#[tokio::test]
async fn chat_streaming_has_openai_chunks_and_done() {
    let sim = Sim::start(args("m")).await;
    let resp = sim
        .post("/v1/chat/completions", json!({"model": "m", "stream": true, "max_tokens": 5, "messages": [{"role": "user", "content": "a b c"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    let data = sse_data(&resp.text().await.expect("body"));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    assert_eq!(chunks.len(), 1 + 5 + 1, "role, 5 tokens, finish");
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "m");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks[1..6]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content")
        })
        .collect();
    assert_eq!(content.split_whitespace().count(), 5);
    assert!(chunks[1..6]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "length");
    sim.stop().await;
}

#[tokio::test]
async fn completion_streaming_with_usage() {
    let sim = Sim::start(args("m")).await;
    let resp = sim
        .post("/v1/completions", json!({"model": "m", "stream": true, "max_tokens": 3, "prompt": "p q", "stream_options": {"include_usage": true}}))
        .await;
    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.expect("body"));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    assert_eq!(chunks.len(), 3 + 1 + 1, "3 tokens, finish, usage");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks[..3]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().expect("text"))
        .collect();
    assert_eq!(text.split_whitespace().count(), 3);
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    assert_eq!(
        chunks[4]["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    );
    sim.stop().await;
}

#[tokio::test]
async fn continuous_usage_stats_put_the_usage_so_far_in_every_chunk() {
    let sim = Sim::start(args("m")).await;
    let resp = sim
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "stream": true, "max_tokens": 3,
            "messages": [{"role": "user", "content": "p q"}],
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.expect("body"));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    assert_eq!(chunks.len(), 1 + 3 + 1 + 1, "role, 3 tokens, finish, usage");
    let prompt = chunks[0]["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt");
    let completions: Vec<u64> = chunks
        .iter()
        .map(|c| {
            assert_eq!(c["usage"]["prompt_tokens"], prompt, "{c}");
            assert_eq!(
                c["usage"]["total_tokens"].as_u64(),
                c["usage"]["completion_tokens"].as_u64().map(|n| n + prompt)
            );
            c["usage"]["completion_tokens"]
                .as_u64()
                .expect("completion")
        })
        .collect();
    assert_eq!(completions, vec![0, 1, 2, 3, 3, 3]);
    assert_eq!(chunks[5]["choices"], json!([]));
    // Without it, only the last chunk has a usage.
    let resp = sim
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "stream": true, "max_tokens": 3,
            "messages": [{"role": "user", "content": "p q"}],
            "stream_options": {"include_usage": true}}),
        )
        .await;
    let data = sse_data(&resp.text().await.expect("body"));
    let with_usage = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|c| c.get("usage").is_some_and(|u| !u.is_null()))
        .count();
    assert_eq!(with_usage, 1);
    sim.stop().await;
}

#[tokio::test]
async fn malformed_requests_and_unknown_models_get_openai_errors() {
    let sim = Sim::start(args("m")).await;
    let cases = [
        ("/v1/completions", None, 400),
        ("/v1/completions", Some(json!({"prompt": "no model"})), 400),
        (
            "/v1/completions",
            Some(json!({"model": "m", "prompt": "x", "max_tokens": 0})),
            400,
        ),
        (
            "/v1/chat/completions",
            Some(json!({"model": "m", "messages": []})),
            400,
        ),
        (
            "/v1/chat/completions",
            Some(json!({"model": "m", "messages": "hi"})),
            400,
        ),
        (
            "/v1/chat/completions",
            Some(json!({"model": "other", "messages": [{"role": "user", "content": "x"}]})),
            404,
        ),
        (
            "/v1/completions",
            Some(json!({"model": "other", "prompt": "x"})),
            404,
        ),
    ];
    for (path, body, status) in cases {
        let req = sim
            .http
            .post(sim.url(path))
            .header("content-type", "application/json");
        let resp = match &body {
            Some(b) => req.body(b.to_string()),
            None => req.body("{not json"),
        }
        .send()
        .await
        .expect("send");
        assert_eq!(resp.status(), status, "{path} {body:?}");
        let v: Value = resp.json().await.expect("error body is json");
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        if status == 404 {
            assert_eq!(v["error"]["code"], "model_not_found");
        }
    }
    sim.stop().await;
}

#[tokio::test]
async fn metrics_count_running_and_waiting_requests() {
    let sim = Sim::start(SimArgs {
        max_num_seqs: 2,
        itl_ms: 20,
        ..SimArgs::for_tests("m")
    })
    .await;
    let text = sim.metrics().await;
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} declared");
        assert!(
            text.contains(&format!("{name}{{model_name=\"m\"}} 0")),
            "{name} zero at start"
        );
    }

    let mut requests = Vec::new();
    for _ in 0..3 {
        let http = sim.http.clone();
        let url = sim.url("/v1/completions");
        requests.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .json(&json!({"model": "m", "prompt": "a b", "max_tokens": 10}))
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.expect("json")
        }));
    }
    wait_until("2 running, 1 waiting", Duration::from_secs(5), || async {
        let m = sim.metrics().await;
        metric(&m, "vllm:num_requests_running") == 2.0
            && metric(&m, "vllm:num_requests_waiting") == 1.0
    })
    .await;
    assert_eq!(sim.gauge("vllm:kv_cache_usage_perc").await, 1.0);
    for r in requests {
        let v = r.await.expect("join");
        assert_eq!(v["usage"]["completion_tokens"], 10);
    }
    let m = sim.metrics().await;
    assert_eq!(metric(&m, "vllm:num_requests_running"), 0.0);
    assert_eq!(metric(&m, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(metric(&m, "vllm:prompt_tokens_total"), 6.0);
    assert_eq!(metric(&m, "vllm:generation_tokens_total"), 30.0);
    sim.stop().await;
}

#[tokio::test]
async fn a_disconnected_stream_frees_its_slot() {
    let sim = Sim::start(SimArgs {
        max_num_seqs: 1,
        itl_ms: 20,
        ..SimArgs::for_tests("m")
    })
    .await;
    let resp = sim
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "x", "max_tokens": 10000, "stream": true}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a chunk").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("data:"));

    // A second request has to wait for the only slot.
    let waiting = {
        let http = sim.http.clone();
        let url = sim.url("/v1/completions");
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"model": "m", "prompt": "x", "max_tokens": 2}))
                .send()
                .await
                .expect("send")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    wait_until("1 running, 1 waiting", Duration::from_secs(5), || async {
        let m = sim.metrics().await;
        metric(&m, "vllm:num_requests_running") == 1.0
            && metric(&m, "vllm:num_requests_waiting") == 1.0
    })
    .await;

    drop(body); // the streaming client goes away
    let v = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter runs")
        .expect("join");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    wait_until("nothing running", Duration::from_secs(5), || async {
        sim.gauge("vllm:num_requests_running").await == 0.0
    })
    .await;
    sim.stop().await;
}

/// With a `seed`, a continuation of a partial answer (chat's
/// `continue_final_message`, or a completion prompt extended with the
/// partial text) gives exactly the rest of the uncut answer.
#[tokio::test]
async fn seeded_continuations_give_the_rest_of_the_answer() {
    let sim = Sim::start(args("m")).await;
    let text_of = |v: &Value| -> String {
        let c = &v["choices"][0];
        c["message"]["content"]
            .as_str()
            .or_else(|| c["text"].as_str())
            .expect("text")
            .to_string()
    };
    let user = json!({"role": "user", "content": "tell me about fleets"});
    let whole: Value = sim
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "seed": 11, "max_tokens": 10, "messages": [user]}),
        )
        .await
        .json()
        .await
        .expect("json");
    let whole = text_of(&whole);
    assert_eq!(whole.split_whitespace().count(), 10);
    let words: Vec<&str> = whole.split_whitespace().collect();
    let partial = words[..4].join(" ");
    let rest: Value = sim
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "seed": 11, "max_tokens": 6,
                   "continue_final_message": true, "add_generation_prompt": false,
                   "messages": [user, {"role": "assistant", "content": partial}]}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(format!("{partial}{}", text_of(&rest)), whole);

    // Completions: the prompt plus the partial text.
    let whole: Value = sim
        .post(
            "/v1/completions",
            json!({"model": "m", "seed": 5, "max_tokens": 9, "prompt": "once upon"}),
        )
        .await
        .json()
        .await
        .expect("json");
    let whole = text_of(&whole);
    assert!(whole.starts_with(' '), "continues the prompt: {whole:?}");
    let cut = whole.match_indices(' ').nth(3).expect("4 words").0;
    let (partial, _) = whole.split_at(cut);
    let rest: Value = sim
        .post(
            "/v1/completions",
            json!({"model": "m", "seed": 5, "max_tokens": 6, "prompt": format!("once upon{partial}")}),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(format!("{partial}{}", text_of(&rest)), whole);

    // Both flags at once is vLLM's 400.
    let bad = sim
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "continue_final_message": true, "add_generation_prompt": true,
                   "messages": [{"role": "assistant", "content": "x"}]}),
        )
        .await;
    assert_eq!(bad.status(), 400);
    sim.stop().await;
}
