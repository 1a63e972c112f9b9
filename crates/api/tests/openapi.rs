//! The OpenAPI document against the server's behaviour: every operation,
//! sent what a careless client sends (no token, no content type, broken or
//! oversized JSON, malformed ids, out-of-range or ill-formed query values),
//! answers one of the statuses it declares, with a JSON error naming the
//! field; and each `pattern` the document gives accepts exactly what the
//! server's parser accepts.

mod common;

use common::*;
use gpufleet_domain::{DeploymentId, InstanceId, ModelName, ProviderName};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::collections::BTreeSet;

/// One operation of the document.
struct Operation {
    method: Method,
    /// The path template, e.g. `/api/v1/instances/{id}`.
    path: String,
    op: Value,
}

impl Operation {
    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    fn declared(&self) -> BTreeSet<u16> {
        self.op["responses"]
            .as_object()
            .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// The security scheme it names, if any (`bearer`, `agent_token`).
    fn scheme(&self) -> Option<String> {
        self.op["security"]
            .as_array()?
            .iter()
            .find_map(|s| s.as_object()?.keys().next().cloned())
    }

    fn params(&self, place: &str) -> Vec<Value> {
        self.op["parameters"]
            .as_array()
            .map(|ps| ps.iter().filter(|p| p["in"] == place).cloned().collect())
            .unwrap_or_default()
    }

    fn has_body(&self) -> bool {
        self.op.get("requestBody").is_some()
    }

    /// Body limit of the route (agent routes take less).
    fn body_limit(&self) -> usize {
        if self.path.starts_with("/internal/") {
            gpufleet_api::AGENT_BODY_LIMIT_BYTES
        } else {
            gpufleet_api::BODY_LIMIT_BYTES
        }
    }
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let Ok(method) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            out.push(Operation {
                method,
                path: path.clone(),
                op: op.clone(),
            });
        }
    }
    out
}

/// `schema`, with a `$ref` to a component resolved.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.rsplit('/').next().expect("ref name");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// The schema's types (`type` may be a string or a list).
fn types(schema: &Value) -> Vec<&str> {
    match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Values the schema of a query parameter rules out (to be answered 400).
fn bad_values(doc: &Value, schema: &Value) -> Vec<String> {
    let schema = resolve(doc, schema);
    let mut bad = Vec::new();
    let ts = types(schema);
    if ts.contains(&"integer") {
        bad.push("many".to_string());
        if let Some(min) = schema["minimum"].as_i64() {
            bad.push((min - 1).to_string());
        }
    } else if ts.contains(&"boolean") {
        bad.push("maybe".to_string());
    } else if ts.contains(&"array") {
        if resolve(doc, &schema["items"]).get("enum").is_some() {
            bad.push("no-such-value".to_string());
        }
    } else if schema.get("pattern").is_some()
        || schema.get("enum").is_some()
        || schema.get("format").is_some()
    {
        bad.push("no such value!".to_string());
    }
    bad
}

/// A path value the schema allows (its example), and one it rules out.
fn path_values(doc: &Value, param: &Value) -> (String, String) {
    let schema = resolve(doc, &param["schema"]);
    let good = schema["examples"][0]
        .as_str()
        .or_else(|| schema["example"].as_str())
        .unwrap_or_else(|| panic!("path parameter {param} has no example"))
        .to_string();
    (good, "Not-An-Id".to_string())
}

/// Send `req`; assert the operation declares the status it got, and that
/// an error is JSON naming `field` when one is given. Returns the status.
async fn answer(
    op: &Operation,
    what: &str,
    req: reqwest::RequestBuilder,
    field: Option<&str>,
) -> StatusCode {
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    assert!(
        op.declared().contains(&status.as_u16()),
        "{} ({what}) answered {status}, which it does not declare ({:?})",
        op.name(),
        op.declared()
    );
    if status.is_client_error() || status.is_server_error() {
        let body = expect_error(resp, status).await;
        if let Some(field) = field {
            assert_eq!(
                body.error.field.as_deref(),
                Some(field),
                "{} ({what}): {body:?}",
                op.name()
            );
        }
    }
    status
}

struct Fixture {
    app: TestApp,
    doc: Value,
    agent_token: String,
}

async fn fixture() -> Fixture {
    let app = TestApp::spawn().await;
    let doc: Value = expect_json(app.get("/api/v1/openapi.json").await, StatusCode::OK).await;
    let id = app.create(1).await[0].id;
    let agent_token = app.register_agent(id).await;
    Fixture {
        app,
        doc,
        agent_token,
    }
}

impl Fixture {
    /// A request for `op` at `path` with the credentials it needs.
    fn request(&self, op: &Operation, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .app
            .client
            .request(op.method.clone(), self.app.url(path));
        match op.scheme().as_deref() {
            Some("bearer") => req.bearer_auth(ADMIN_TOKEN),
            Some("agent_token") => req.bearer_auth(&self.agent_token),
            _ => req,
        }
    }

    /// The path with its parameters replaced by their examples.
    fn example_path(&self, op: &Operation) -> String {
        let mut path = op.path.clone();
        for p in op.params("path") {
            let name = p["name"].as_str().expect("name");
            let (good, _) = path_values(&self.doc, &p);
            path = path.replace(&format!("{{{name}}}"), &good);
        }
        path
    }
}

#[tokio::test]
async fn every_operation_declares_what_bad_requests_get() {
    let f = fixture().await;
    let ops = operations(&f.doc);
    assert!(ops.len() > 20, "too few operations: {}", ops.len());
    // How many of each kind were tried: the loop must not pass by trying nothing.
    let (mut paths, mut queries, mut bodies) = (0, 0, 0);
    for op in &ops {
        let path = f.example_path(op);

        // Credentials: none, and a wrong one, are 401.
        if op.scheme().is_some() {
            let req = f.app.client.request(op.method.clone(), f.app.url(&path));
            let got = answer(op, "no token", req, None).await;
            assert_eq!(got, StatusCode::UNAUTHORIZED, "{}", op.name());
            let req = f
                .app
                .client
                .request(op.method.clone(), f.app.url(&path))
                .bearer_auth("wrong");
            let got = answer(op, "wrong token", req, None).await;
            assert_eq!(got, StatusCode::UNAUTHORIZED, "{}", op.name());
        }

        // Path parameters: malformed is 400 naming it; well-formed but
        // unknown is 404 (the examples name nothing that exists).
        for p in op.params("path") {
            let name = p["name"].as_str().expect("name");
            // This one malformed, any other one well-formed.
            let mut bad_path = op.path.clone();
            for q in op.params("path") {
                let other = q["name"].as_str().expect("name");
                let (good, bad) = path_values(&f.doc, &q);
                let value = if other == name { bad } else { good };
                bad_path = bad_path.replace(&format!("{{{other}}}"), &value);
            }
            let req = f.request(op, &bad_path);
            let got = answer(op, "malformed path parameter", req, Some(name)).await;
            assert_eq!(got, StatusCode::BAD_REQUEST, "{}", op.name());
            paths += 1;
            if !op.has_body() {
                let got = answer(op, "unknown resource", f.request(op, &path), None).await;
                assert_eq!(got, StatusCode::NOT_FOUND, "{}", op.name());
            }
        }

        // Query parameters the schema rules out are 400 naming them.
        for p in op.params("query") {
            let name = p["name"].as_str().expect("name");
            for bad in bad_values(&f.doc, &p["schema"]) {
                let req = f.request(op, &path).query(&[(name, bad.as_str())]);
                let got = answer(op, &format!("{name}={bad}"), req, Some(name)).await;
                assert_eq!(got, StatusCode::BAD_REQUEST, "{} {name}={bad}", op.name());
                queries += 1;
            }
        }

        // Bodies: no JSON content type is 415, broken JSON 400, too big 413.
        if op.has_body() {
            let req = f.request(op, &path).body("{}");
            let got = answer(op, "no content type", req, None).await;
            assert_eq!(got, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", op.name());
            let req = f
                .request(op, &path)
                .header("content-type", "text/plain")
                .body("{}");
            let got = answer(op, "text/plain", req, None).await;
            assert_eq!(got, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", op.name());
            let req = f
                .request(op, &path)
                .header("content-type", "application/json")
                .body("{");
            let got = answer(op, "broken JSON", req, None).await;
            assert_eq!(got, StatusCode::BAD_REQUEST, "{}", op.name());
            let req = f
                .request(op, &path)
                .header("content-type", "application/json")
                .body(vec![b' '; op.body_limit() + 1]);
            let got = answer(op, "oversized body", req, None).await;
            assert_eq!(got, StatusCode::PAYLOAD_TOO_LARGE, "{}", op.name());
            bodies += 1;
        }
    }
    assert!(
        paths >= 7 && queries >= 12 && bodies >= 6,
        "tried {paths} path parameters, {queries} query values, {bodies} bodies"
    );
}

#[tokio::test]
async fn required_body_fields_are_named_when_missing() {
    let f = fixture().await;
    for op in operations(&f.doc).iter().filter(|o| o.has_body()) {
        let schema = resolve(
            &f.doc,
            &op.op["requestBody"]["content"]["application/json"]["schema"],
        );
        let Some(required) = schema["required"].as_array() else {
            continue;
        };
        let Some(first) = required.first().and_then(Value::as_str) else {
            continue;
        };
        let req = f
            .request(op, &f.example_path(op))
            .json(&serde_json::json!({}));
        let got = answer(op, "empty object", req, Some(first)).await;
        assert_eq!(got, StatusCode::BAD_REQUEST, "{}", op.name());
    }
}

#[tokio::test]
async fn count_maximum_is_the_servers() {
    let f = fixture().await;
    let count = &f.doc["components"]["schemas"]["CreateInstancesBody"]["properties"]["count"];
    assert_eq!(count["minimum"], 1, "{count}");
    assert_eq!(count["maximum"], MAX_COUNT, "{count}");
    let too_many = serde_json::json!({
        "provider": PROVIDER, "instance_type": TYPE, "model": MODEL, "count": MAX_COUNT + 1
    });
    let body = expect_error(
        f.app.post("/api/v1/instances", &too_many).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(body.error.field.as_deref(), Some("count"));
}

/// Strings near the edges of the id and name formats.
fn samples() -> Vec<String> {
    let hex = "0192f5a0c3b47d1e9a4b5c6d7e8f9a0b";
    let mut s: Vec<String> = [
        "",
        "i-",
        "ak-",
        "mock",
        "Mock",
        "mock-2",
        "-",
        "a/b",
        "/a",
        "a/",
        "/",
        "a",
        "a b",
        "a\n",
        "é",
        "meta-llama/Llama-3.1-8B-Instruct",
        "x@y:z_w.v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for prefix in ["i-", "d-", "ak-", "I-", "", "x-"] {
        s.push(format!("{prefix}{hex}"));
        s.push(format!("{prefix}{}", hex.to_uppercase()));
        s.push(format!("{prefix}{}", &hex[1..]));
        s.push(format!("{prefix}{hex}0"));
        s.push(format!("{prefix}{hex}\n"));
        s.push(format!("{prefix}{}g", &hex[1..]));
    }
    s.push("x".repeat(32));
    s.push("x".repeat(33));
    s.push("x".repeat(200));
    s.push("x".repeat(201));
    s
}

fn full_match(pattern: &str) -> regex::Regex {
    // JSON Schema patterns are ECMA-262; these use only what both dialects
    // read alike. `$` in ECMA-262 (without the m flag) is the very end.
    regex::Regex::new(&pattern.replace('$', r"\z")).expect("pattern compiles")
}

#[tokio::test]
async fn patterns_accept_what_the_parsers_accept() {
    let app = TestApp::spawn().await;
    let doc: Value = expect_json(app.get("/api/v1/openapi.json").await, StatusCode::OK).await;
    let schemas = &doc["components"]["schemas"];
    type Parser = fn(&str) -> bool;
    let cases: [(&str, Parser); 4] = [
        ("InstanceId", |s| s.parse::<InstanceId>().is_ok()),
        ("DeploymentId", |s| s.parse::<DeploymentId>().is_ok()),
        ("ModelName", |s| s.parse::<ModelName>().is_ok()),
        ("ProviderName", |s| s.parse::<ProviderName>().is_ok()),
    ];
    for (name, parses) in cases {
        let pattern = schemas[name]["pattern"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no pattern"));
        let re = full_match(pattern);
        for s in samples() {
            assert_eq!(
                re.is_match(&s),
                parses(&s),
                "{name}: pattern {pattern} and the parser disagree on {s:?}"
            );
        }
    }
    // The server's own answer for API key ids: 400 for what the pattern
    // rules out, 404 for a well-formed unknown id.
    let re = full_match(schemas["ApiKeyId"]["pattern"].as_str().unwrap());
    for s in samples() {
        if s.is_empty() || s.contains(['/', '\n', ' ', 'é']) {
            continue;
        }
        let resp = app.delete(&format!("/api/v1/api-keys/{s}")).await;
        let want = if re.is_match(&s) {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::BAD_REQUEST
        };
        assert_eq!(resp.status(), want, "DELETE /api/v1/api-keys/{s}");
    }
}

/// The "not blank" patterns (instance type, zone, API key name) rule out
/// exactly what the server trims to nothing.
#[tokio::test]
async fn not_blank_patterns_match_what_the_server_trims() {
    let app = TestApp::spawn().await;
    let doc: Value = expect_json(app.get("/api/v1/openapi.json").await, StatusCode::OK).await;
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("CreateInstancesBody", "instance_type"),
        ("CreateInstancesBody", "zone"),
        ("CreateApiKeyBody", "name"),
    ] {
        let pattern = schemas[schema]["properties"][field]["pattern"]
            .as_str()
            .unwrap_or_else(|| panic!("{schema}.{field} has no pattern"));
        // Unanchored, as JSON Schema patterns are.
        let re = regex::Regex::new(pattern).expect("pattern compiles");
        let chars = (0u32..=0x3100)
            .chain([0xfeff, 0x1f600])
            .filter_map(char::from_u32);
        for c in chars {
            for s in [c.to_string(), format!(" {c}\t"), format!("{c}{c}")] {
                assert_eq!(
                    re.is_match(&s),
                    !s.trim().is_empty(),
                    "{schema}.{field}: pattern {pattern} and trim disagree on {s:?}"
                );
            }
        }
    }
}
