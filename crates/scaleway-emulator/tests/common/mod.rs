#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use gpufleet_scaleway_emulator::{Emulator, EmulatorConfig};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const KEY: &str = "11111111-2222-4333-8444-555555555555";
pub const PROJECT: &str = "105bdce1-64c0-48ab-899d-868455867ecf";
pub const Z: &str = "/instance/v1/zones/fr-par-2";

pub struct Env {
    pub emu: Emulator,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

pub async fn start(tweak: impl FnOnce(&mut EmulatorConfig)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EmulatorConfig::new(KEY, PROJECT, dir.path().to_path_buf());
    tweak(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu = Emulator::start(cfg, listener).await.unwrap();
    Env {
        emu,
        http: reqwest::Client::new(),
        dir,
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

impl Env {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.emu.url(), path)
    }

    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Result<Answer> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("X-Auth-Token", KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await?;
        Ok(Answer {
            status,
            headers,
            text,
        })
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.try_call(method, path, body).await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn create_server(&self, body: Value) -> Value {
        let a = self.post(&format!("{Z}/servers"), body).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
        a.json()["server"].clone()
    }

    pub async fn action(&self, id: &str, action: &str) -> Answer {
        self.post(
            &format!("{Z}/servers/{id}/action"),
            serde_json::json!({ "action": action }),
        )
        .await
    }

    pub async fn server_state(&self, id: &str) -> Option<String> {
        let a = self.get(&format!("{Z}/servers/{id}")).await;
        if a.status == StatusCode::NOT_FOUND {
            return None;
        }
        Some(a.json()["server"]["state"].as_str().unwrap().to_string())
    }

    pub async fn wait_state(&self, id: &str, want: Option<&str>) {
        let id = id.to_string();
        let want = want.map(str::to_string);
        poll(Duration::from_secs(10), || async {
            self.server_state(&id).await == want
        })
        .await;
    }
}

/// Polls `f` until it is true; panics at the deadline.
pub async fn poll<F, Fut>(deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < end,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
