//! Who may call what: every operation of the OpenAPI document × every kind
//! of caller (the admin token; a project's admin, operator and viewer; a
//! user with no role; nobody) × a resource in the caller's own project and
//! in another. Each answer must be what the role table says: allowed
//! (2xx, or 409 when the resource's state forbids it), 403 (a role that
//! does not allow it), 404 (another project's resource: its existence never
//! shows), 401 (no credentials). An operation the table does not know
//! fails the test, so a new route cannot skip it.
//!
//! Also: sessions (password sign-in, the CSRF header on writes, sign-out),
//! personal access tokens (revoked ones stop working), lists that never
//! show another project's resources, and the audit log of all of it.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Admin,
    ProjAdmin,
    Operator,
    Viewer,
    NoRole,
    Anonymous,
}

const EVERYONE: [Who; 6] = [
    Who::Admin,
    Who::ProjAdmin,
    Who::Operator,
    Who::Viewer,
    Who::NoRole,
    Who::Anonymous,
];

/// Which project the request's resource is in, from the caller's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Own,
    Other,
}

/// What the answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// 2xx (or 409: allowed, but the resource's state forbids it).
    Allowed,
    Forbidden,
    Hidden,
    Unauthorized,
}

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Any signed-in caller (catalog, who am I...).
    SignedIn,
    /// Read in the resource's project.
    Read,
    /// Operate (instances, deployments) in the resource's project.
    Operate,
    /// Manage API keys in the resource's project.
    Keys,
    /// Manage members in the resource's project.
    Members,
    /// The admin token only.
    AdminToken,
    /// A user (personal access tokens); the admin token has none.
    UserOnly,
    /// One of the caller's own tokens: the admin token has none (404).
    OwnToken,
    /// The admin token or a project admin (somewhere).
    AdminOrProjectAdmin,
    /// Lists: every signed-in caller gets 200, filtered to what they see.
    List,
}

fn expect(needs: Needs, who: Who, target: Target) -> Expect {
    use Expect::*;
    if who == Who::Anonymous {
        return Unauthorized;
    }
    let role = match who {
        Who::ProjAdmin => Some(3),
        Who::Operator => Some(2),
        Who::Viewer => Some(1),
        _ => None,
    };
    match needs {
        Needs::SignedIn | Needs::List => Allowed,
        Needs::AdminToken => {
            if who == Who::Admin {
                Allowed
            } else {
                Forbidden
            }
        }
        Needs::UserOnly => {
            if who == Who::Admin {
                Forbidden
            } else {
                Allowed
            }
        }
        Needs::OwnToken => {
            if who == Who::Admin {
                Hidden
            } else {
                Allowed
            }
        }
        Needs::AdminOrProjectAdmin => {
            if matches!(who, Who::Admin | Who::ProjAdmin) {
                Allowed
            } else {
                Forbidden
            }
        }
        Needs::Read | Needs::Operate | Needs::Keys | Needs::Members => {
            if who == Who::Admin {
                return Allowed;
            }
            // Users have roles in the own project only.
            let Some(level) = role.filter(|_| target == Target::Own) else {
                return Hidden;
            };
            let need = match needs {
                Needs::Read => 1,
                Needs::Operate | Needs::Keys => 2,
                _ => 3,
            };
            if level >= need {
                Allowed
            } else {
                Forbidden
            }
        }
    }
}

/// The role table, by (method, path template). Agent, health and
/// exporter routes are outside it (their own credentials, or none).
fn needs_of(method: &str, path: &str) -> Option<Needs> {
    use Needs::*;
    Some(match (method, path) {
        ("POST", "/api/v1/instances") => Operate,
        ("GET", "/api/v1/instances") => List,
        ("GET", "/api/v1/instances/{id}") => Read,
        ("DELETE", "/api/v1/instances/{id}") => Operate,
        ("POST", "/api/v1/instances/{id}/archive") => Operate,
        ("GET", "/api/v1/instances/{id}/events") => Read,
        ("GET", "/api/v1/instances/{id}/metrics") => Read,
        ("POST", "/api/v1/deployments") => Operate,
        ("GET", "/api/v1/deployments") => List,
        ("GET", "/api/v1/deployments/{id}") => Read,
        ("PATCH", "/api/v1/deployments/{id}") => Operate,
        ("DELETE", "/api/v1/deployments/{id}") => Operate,
        ("GET", "/api/v1/deployments/{id}/events") => Read,
        ("GET", "/api/v1/providers") => SignedIn,
        ("GET", "/api/v1/providers/{name}/instance-types") => SignedIn,
        ("GET", "/api/v1/models") => SignedIn,
        ("GET", "/api/v1/events") => List,
        ("GET", "/api/v1/system/tasks") => AdminToken,
        ("GET", "/api/v1/openapi.json") => SignedIn,
        ("GET", "/api/v1/metrics/fleet") => SignedIn,
        ("GET", "/api/v1/prometheus/targets") => AdminToken,
        ("POST", "/api/v1/api-keys") => Keys,
        ("GET", "/api/v1/api-keys") => List,
        ("PATCH", "/api/v1/api-keys/{id}") => Keys,
        ("DELETE", "/api/v1/api-keys/{id}") => Keys,
        ("GET", "/api/v1/usage") => List,
        ("GET", "/api/v1/spend") => List,
        ("GET", "/api/v1/audit") => List,
        ("GET", "/api/v1/auth/me") => SignedIn,
        ("POST", "/api/v1/auth/logout") => SignedIn,
        ("POST", "/api/v1/tokens") => UserOnly,
        ("GET", "/api/v1/tokens") => SignedIn,
        ("DELETE", "/api/v1/tokens/{id}") => OwnToken,
        ("POST", "/api/v1/users") => AdminToken,
        ("GET", "/api/v1/users") => AdminOrProjectAdmin,
        ("POST", "/api/v1/projects") => AdminToken,
        ("GET", "/api/v1/projects") => List,
        ("GET", "/api/v1/projects/{id}") => Read,
        ("GET", "/api/v1/projects/{id}/members") => Read,
        ("PUT", "/api/v1/projects/{id}/members/{user_id}") => Members,
        ("DELETE", "/api/v1/projects/{id}/members/{user_id}") => Members,
        _ => return None,
    })
}

/// Routes outside the role table.
fn outside_the_table(path: &str) -> bool {
    path.starts_with("/internal/")
        || matches!(
            path,
            "/healthz"
                | "/readyz"
                | "/metrics"
                | "/downloads/gpufleet"
                | "/api/v1/auth/login"
                | "/api/v1/auth/providers"
        )
}

struct User {
    token: String,
}

/// Everything the matrix needs: two projects, a user per role in the
/// first, and a resource of each kind in both.
struct World {
    app: TestApp,
    users: Vec<(Who, User)>,
    /// A user whose roles the member routes grant and take.
    dummy: String,
    /// (own, other) ids by resource kind.
    instances: (String, String),
    deployments: (String, String),
    keys: (String, String),
}

const OWN: &str = "alpha";
const OTHER: &str = "beta";

async fn json_of(resp: reqwest::Response, want: StatusCode) -> Value {
    let status = resp.status();
    let url = resp.url().clone();
    let text = resp.text().await.unwrap();
    assert_eq!(status, want, "{url}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn make_user(app: &TestApp, email: &str) -> String {
    let u = json_of(
        app.post(
            "/api/v1/users",
            &json!({"email": email, "display_name": email, "password": "correct horse battery staple"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    u["id"].as_str().unwrap().to_string()
}

async fn grant(app: &TestApp, project: &str, user: &str, role: &str) {
    let resp = app
        .admin(
            Method::PUT,
            &format!("/api/v1/projects/{project}/members/{user}"),
        )
        .json(&json!({"role": role}))
        .send()
        .await
        .unwrap();
    json_of(resp, StatusCode::OK).await;
}

/// Sign in with the password and make a personal access token.
async fn token_of(app: &TestApp, email: &str) -> String {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let resp = client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": email, "password": "correct horse battery staple"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let csrf = resp
        .cookies()
        .find(|c| c.name() == "gpufleet_csrf")
        .map(|c| c.value().to_string())
        .unwrap();
    let t = client
        .post(app.url("/api/v1/tokens"))
        .header("x-csrf-token", csrf)
        .json(&json!({"name": "matrix"}))
        .send()
        .await
        .unwrap();
    json_of(t, StatusCode::CREATED).await["token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn create_in(app: &TestApp, project: &str, i: usize) -> (String, String, String) {
    let inst = json_of(
        app.post(
            "/api/v1/instances",
            &json!({"project": project, "provider": PROVIDER, "instance_type": TYPE, "model": MODEL}),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let dep = json_of(
        app.post(
            "/api/v1/deployments",
            &json!({
                "project": project,
                "name": format!("dep-{i}"),
                "model": MODEL,
                "placements": [{"provider": PROVIDER, "zone": ZONE, "instance_type": TYPE}],
                "replicas": {"min": 0, "max": 1},
                "scale_to_zero_after": "1h"
            }),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let key = json_of(
        app.post(
            "/api/v1/api-keys",
            &json!({"project": project, "name": format!("key-{i}")}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    (
        inst["instances"][0]["id"].as_str().unwrap().to_string(),
        dep["id"].as_str().unwrap().to_string(),
        key["id"].as_str().unwrap().to_string(),
    )
}

impl World {
    async fn build() -> World {
        let app = TestApp::spawn().await;
        for p in [OWN, OTHER] {
            json_of(
                app.post("/api/v1/projects", &json!({"id": p})).await,
                StatusCode::CREATED,
            )
            .await;
        }
        let mut users = Vec::new();
        for (who, email, role) in [
            (Who::ProjAdmin, "padmin@example.com", Some("admin")),
            (Who::Operator, "op@example.com", Some("operator")),
            (Who::Viewer, "viewer@example.com", Some("viewer")),
            (Who::NoRole, "nobody@example.com", None),
        ] {
            let id = make_user(&app, email).await;
            if let Some(r) = role {
                grant(&app, OWN, &id, r).await;
            }
            let token = token_of(&app, email).await;
            users.push((who, User { token }));
        }
        let dummy = make_user(&app, "dummy@example.com").await;
        let own = create_in(&app, OWN, 1).await;
        let other = create_in(&app, OTHER, 2).await;
        // Each deployment starts one replica: wait for both, so that lists
        // hold still afterwards.
        for project in [OWN, OTHER] {
            wait_for(&format!("the replica of {project}'s deployment"), || {
                let app = &app;
                async move {
                    let list = json_of(
                        app.get(&format!("/api/v1/instances?project={project}"))
                            .await,
                        StatusCode::OK,
                    )
                    .await;
                    (list["instances"].as_array().map_or(0, |a| a.len()) >= 2).then_some(())
                }
            })
            .await;
        }
        World {
            app,
            users,
            dummy,
            instances: (own.0, other.0),
            deployments: (own.1, other.1),
            keys: (own.2, other.2),
        }
    }

    fn token(&self, who: Who) -> Option<String> {
        match who {
            Who::Admin => Some(ADMIN_TOKEN.to_string()),
            Who::Anonymous => None,
            w => self
                .users
                .iter()
                .find(|(x, _)| *x == w)
                .map(|(_, u)| u.token.clone()),
        }
    }

    fn pick<'a>(&self, pair: &'a (String, String), t: Target) -> &'a str {
        match t {
            Target::Own => &pair.0,
            Target::Other => &pair.1,
        }
    }

    /// The concrete path and body of an operation for this target.
    async fn request(
        &self,
        who: Who,
        method: &str,
        path: &str,
        target: Target,
    ) -> (String, Option<Value>) {
        let project = match target {
            Target::Own => OWN,
            Target::Other => OTHER,
        };
        let id = if path.starts_with("/api/v1/instances/") {
            self.pick(&self.instances, target).to_string()
        } else if path.starts_with("/api/v1/deployments/") {
            self.pick(&self.deployments, target).to_string()
        } else if path.starts_with("/api/v1/api-keys/") {
            self.pick(&self.keys, target).to_string()
        } else if path.starts_with("/api/v1/projects/") {
            project.to_string()
        } else if path.starts_with("/api/v1/tokens/") {
            // A fresh token of the caller's own (users), or any well-formed id.
            match self.token(who).filter(|_| who != Who::Admin) {
                Some(t) => {
                    let resp = self
                        .app
                        .client
                        .post(self.app.url("/api/v1/tokens"))
                        .bearer_auth(t)
                        .json(&json!({"name": "to revoke"}))
                        .send()
                        .await
                        .unwrap();
                    json_of(resp, StatusCode::CREATED).await["id"]
                        .as_str()
                        .unwrap()
                        .to_string()
                }
                None => "pat-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b".to_string(),
            }
        } else {
            String::new()
        };
        if path.contains("{user_id}") && method == "DELETE" {
            // Something to take away, in both projects.
            grant(&self.app, OWN, &self.dummy, "viewer").await;
            grant(&self.app, OTHER, &self.dummy, "viewer").await;
        }
        let concrete = path
            .replace("{id}", &id)
            .replace("{user_id}", &self.dummy)
            .replace("{name}", PROVIDER);
        let body = match (method, path) {
            ("POST", "/api/v1/instances") => Some(
                json!({"project": project, "provider": PROVIDER, "instance_type": TYPE, "model": MODEL}),
            ),
            ("POST", "/api/v1/deployments") => Some(json!({
                "project": project,
                "name": format!("m-{}", rand_suffix()),
                "model": MODEL,
                "placements": [{"provider": PROVIDER, "zone": ZONE, "instance_type": TYPE}],
                "replicas": {"min": 0, "max": 1},
                "scale_to_zero_after": "1h"
            })),
            ("PATCH", "/api/v1/deployments/{id}") => {
                Some(json!({"replicas": {"min": 0, "max": 2}}))
            }
            ("POST", "/api/v1/api-keys") => Some(json!({"project": project, "name": "k"})),
            ("PATCH", "/api/v1/api-keys/{id}") => Some(json!({"rpm": 100})),
            ("POST", "/api/v1/tokens") => Some(json!({"name": "t"})),
            ("POST", "/api/v1/users") => Some(json!({
                "email": format!("u{}@example.com", rand_suffix()),
                "display_name": "U"
            })),
            ("POST", "/api/v1/projects") => Some(json!({"id": format!("p{}", rand_suffix())})),
            ("PUT", _) => Some(json!({"role": "viewer"})),
            ("POST", "/api/v1/auth/logout") => None,
            ("POST", _) => Some(json!({})),
            _ => None,
        };
        (concrete, body)
    }
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Targets that make a difference for an operation.
fn targets_of(needs: Needs) -> &'static [Target] {
    match needs {
        Needs::Read | Needs::Operate | Needs::Keys | Needs::Members => {
            &[Target::Own, Target::Other]
        }
        _ => &[Target::Own],
    }
}

#[tokio::test]
async fn every_route_answers_each_role_as_the_table_says() {
    let w = World::build().await;
    let doc = json_of(w.app.get("/api/v1/openapi.json").await, StatusCode::OK).await;
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut unknown = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            if outside_the_table(path) {
                continue;
            }
            let Some(needs) = needs_of(&m, path) else {
                unknown.insert(format!("{m} {path}"));
                continue;
            };
            for &target in targets_of(needs) {
                for who in EVERYONE {
                    let want = expect(needs, who, target);
                    let (url, body) = w.request(who, &m, path, target).await;
                    let mut req = w
                        .app
                        .client
                        .request(m.parse::<Method>().unwrap(), w.app.url(&url));
                    if let Some(t) = w.token(who) {
                        req = req.bearer_auth(t);
                    }
                    if let Some(b) = &body {
                        req = req.json(b);
                    }
                    if path == "/api/v1/events" {
                        req = req.header("accept", "text/event-stream");
                    }
                    let resp = req.send().await.unwrap();
                    let got = resp.status();
                    // An event stream never ends: its status is enough.
                    let text = if path == "/api/v1/events" {
                        String::new()
                    } else {
                        resp.text().await.unwrap_or_default()
                    };
                    let ok = match want {
                        Expect::Allowed => got.is_success() || got == StatusCode::CONFLICT,
                        Expect::Forbidden => got == StatusCode::FORBIDDEN,
                        Expect::Hidden => got == StatusCode::NOT_FOUND,
                        Expect::Unauthorized => got == StatusCode::UNAUTHORIZED,
                    };
                    if !ok {
                        failures.push(format!(
                            "{m} {path} as {who:?} on {target:?}: want {want:?}, got {got}: {text}"
                        ));
                    }
                    // Hidden means the same answer a missing resource gets:
                    // nothing of the other project shows.
                    if want == Expect::Hidden {
                        assert!(
                            !text.contains(OTHER) || !text.contains("role"),
                            "{m} {path} as {who:?}: a 404 that tells: {text}"
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "operations missing from the role table: {unknown:?}"
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked > 200, "only {checked} cases");
}

#[tokio::test]
async fn lists_never_show_another_projects_resources() {
    let w = World::build().await;
    let viewer = w.token(Who::Viewer).unwrap();
    let get = |path: &str| {
        w.app
            .client
            .get(w.app.url(path))
            .bearer_auth(viewer.clone())
            .send()
    };
    // (Each project's deployment has a replica of its own.)
    let ids_of = |v: &Value| -> BTreeSet<String> {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    let theirs = ids_of(
        &json_of(
            w.app
                .get(&format!("/api/v1/instances?project={OTHER}"))
                .await,
            StatusCode::OK,
        )
        .await,
    );
    let ours = ids_of(
        &json_of(
            w.app.get(&format!("/api/v1/instances?project={OWN}")).await,
            StatusCode::OK,
        )
        .await,
    );
    assert!(theirs.contains(&w.instances.1) && ours.contains(&w.instances.0));
    let list = json_of(get("/api/v1/instances").await.unwrap(), StatusCode::OK).await;
    assert_eq!(ids_of(&list), ours);
    assert!(ids_of(&list).is_disjoint(&theirs));
    let list = json_of(get("/api/v1/deployments").await.unwrap(), StatusCode::OK).await;
    let ids: Vec<&str> = list["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![w.deployments.0.as_str()]);
    let list = json_of(get("/api/v1/api-keys").await.unwrap(), StatusCode::OK).await;
    let ids: Vec<&str> = list["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![w.keys.0.as_str()]);
    let projects = json_of(get("/api/v1/projects").await.unwrap(), StatusCode::OK).await;
    assert_eq!(
        projects,
        json!([{"id": OWN, "created_at": projects[0]["created_at"], "role": "viewer"}])
    );
    // Asking for the other project by name lists nothing rather than
    // telling whether it exists.
    let list = json_of(
        get(&format!("/api/v1/instances?project={OTHER}"))
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(list["instances"], json!([]));
    // The admin token sees both.
    let all = json_of(w.app.get("/api/v1/instances").await, StatusCode::OK).await;
    assert_eq!(ids_of(&all), ours.union(&theirs).cloned().collect());

    // Fleet figures count the caller's projects only (instances keep
    // moving through their life cycle, but none ends during the test).
    let live = |v: &Value| -> i64 {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| !["terminated", "archived"].contains(&i["status"].as_str().unwrap()))
            .count() as i64
    };
    let mine = json_of(get("/api/v1/instances").await.unwrap(), StatusCode::OK).await;
    let fleet = json_of(get("/api/v1/metrics/fleet").await.unwrap(), StatusCode::OK).await;
    assert_eq!(fleet["now"]["instances"], json!(live(&mine)));
    let fleet = json_of(w.app.get("/api/v1/metrics/fleet").await, StatusCode::OK).await;
    assert_eq!(fleet["now"]["instances"], json!(live(&all)));
    assert!(live(&all) > live(&mine));
    let fleet = json_of(
        get(&format!("/api/v1/metrics/fleet?project={OTHER}"))
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(fleet["now"]["instances"], json!(0));
    assert_eq!(fleet["now"]["billable_instances"], json!(0));
}

#[tokio::test]
async fn sessions_need_the_csrf_header_to_write_and_end_at_sign_out() {
    let w = World::build().await;
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    // A wrong password is 401 and says nothing about which part was wrong.
    let bad = client
        .post(w.app.url("/api/v1/auth/login"))
        .json(&json!({"email": "op@example.com", "password": "wrong password!!"}))
        .send()
        .await
        .unwrap();
    let body = json_of(bad, StatusCode::UNAUTHORIZED).await;
    assert_eq!(body["error"]["message"], "wrong email or password");
    let unknown = client
        .post(w.app.url("/api/v1/auth/login"))
        .json(&json!({"email": "ghost@example.com", "password": "wrong password!!"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(unknown, StatusCode::UNAUTHORIZED).await, body);

    let resp = client
        .post(w.app.url("/api/v1/auth/login"))
        .json(&json!({"email": "op@example.com", "password": "correct horse battery staple"}))
        .send()
        .await
        .unwrap();
    let cookies: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("gpufleet_session="))
        .unwrap();
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Lax"),
        "{session}"
    );
    let csrf_cookie = cookies
        .iter()
        .find(|c| c.starts_with("gpufleet_csrf="))
        .unwrap();
    assert!(!csrf_cookie.contains("HttpOnly") && csrf_cookie.contains("SameSite=Strict"));
    let csrf = resp
        .cookies()
        .find(|c| c.name() == "gpufleet_csrf")
        .unwrap()
        .value()
        .to_string();
    let me = json_of(resp, StatusCode::OK).await;
    assert_eq!(me["user"]["email"], "op@example.com");
    assert_eq!(
        me["memberships"],
        json!([{"project_id": OWN, "role": "operator"}])
    );

    // Reads work with the cookie alone; writes need the header.
    let r = client
        .get(w.app.url("/api/v1/instances"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = json!({"project": OWN, "provider": PROVIDER, "instance_type": TYPE, "model": MODEL});
    let r = client
        .post(w.app.url("/api/v1/instances"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let e = json_of(r, StatusCode::FORBIDDEN).await;
    assert_eq!(e["error"]["code"], "csrf");
    let r = client
        .post(w.app.url("/api/v1/instances"))
        .header("x-csrf-token", "not-it")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client
        .post(w.app.url("/api/v1/instances"))
        .header("x-csrf-token", &csrf)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // Sign-out ends the session for good, even for a copy of the cookie.
    let r = client
        .post(w.app.url("/api/v1/auth/logout"))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let token = session
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("gpufleet_session=")
        .to_string();
    let r = w
        .app
        .client
        .get(w.app.url("/api/v1/auth/me"))
        .header("cookie", format!("gpufleet_session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn revoked_tokens_stop_working_and_bad_input_names_the_field() {
    let w = World::build().await;
    let op = w.token(Who::Operator).unwrap();
    let call = |method: Method, path: &str, token: &str| {
        w.app
            .client
            .request(method, w.app.url(path))
            .bearer_auth(token.to_string())
    };
    let created = json_of(
        call(Method::POST, "/api/v1/tokens", &op)
            .json(&json!({"name": "ci", "expires_in_days": 30}))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let secret = created["token"].as_str().unwrap();
    assert!(secret.starts_with("gfp_"));
    let me = json_of(
        call(Method::GET, "/api/v1/auth/me", secret)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(me["user"]["email"], "op@example.com");
    let listed = json_of(
        call(Method::GET, "/api/v1/tokens", &op)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(listed.to_string().contains("\"ci\""));
    assert!(
        !listed.to_string().contains("gfp_"),
        "a listed token shows its secret"
    );
    let r = call(
        Method::DELETE,
        &format!("/api/v1/tokens/{}", created["id"].as_str().unwrap()),
        &op,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    let r = call(Method::GET, "/api/v1/auth/me", secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Bad input: 400 naming the field, and nothing changes.
    let padmin = w.token(Who::ProjAdmin).unwrap();
    let cases: Vec<(Method, String, Value, &str)> = vec![
        (
            Method::PUT,
            format!("/api/v1/projects/{OWN}/members/{}", w.dummy),
            json!({"role": "owner"}),
            "role",
        ),
        (
            Method::PUT,
            format!("/api/v1/projects/{OWN}/members/not-a-user"),
            json!({"role": "viewer"}),
            "user_id",
        ),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            json!({"name": ""}),
            "name",
        ),
        (
            Method::POST,
            "/api/v1/tokens".into(),
            json!({"name": "x", "expires_in_days": 0}),
            "expires_in_days",
        ),
        (
            Method::POST,
            "/api/v1/instances".into(),
            json!({"project": "Not A Project", "provider": PROVIDER, "instance_type": TYPE, "model": MODEL}),
            "project",
        ),
    ];
    for (method, path, body, field) in cases {
        let r = call(method.clone(), &path, &padmin)
            .json(&body)
            .send()
            .await
            .unwrap();
        let e = json_of(r, StatusCode::BAD_REQUEST).await;
        assert_eq!(e["error"]["field"], field, "{method} {path} {body}");
    }
    let r = w
        .app
        .post(
            "/api/v1/users",
            &json!({"email": "x@example.com", "display_name": "X", "password": "short"}),
        )
        .await;
    assert_eq!(
        json_of(r, StatusCode::BAD_REQUEST).await["error"]["field"],
        "password"
    );
    let r = w
        .app
        .post(
            "/api/v1/users",
            &json!({"email": "not an email", "display_name": "X"}),
        )
        .await;
    assert_eq!(
        json_of(r, StatusCode::BAD_REQUEST).await["error"]["field"],
        "email"
    );
    // A body that is not an object is refused, even where every member
    // is optional (serde would read a struct from an array).
    let r = w
        .app
        .admin(Method::PATCH, &format!("/api/v1/api-keys/{}", w.keys.0))
        .json(&json!([null, null]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = w.app.post("/api/v1/projects", &json!({"id": "-bad"})).await;
    assert_eq!(
        json_of(r, StatusCode::BAD_REQUEST).await["error"]["field"],
        "id"
    );
    // Nothing of that was recorded.
    let members = json_of(
        call(
            Method::GET,
            &format!("/api/v1/projects/{OWN}/members"),
            &padmin,
        )
        .send()
        .await
        .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(!members.to_string().contains(&w.dummy));
}

#[tokio::test]
async fn the_audit_log_records_changes_refusals_and_sign_ins() {
    let w = World::build().await;
    let viewer = w.token(Who::Viewer).unwrap();
    // A refused terminate, then an allowed one.
    let path = format!("/api/v1/instances/{}", w.instances.0);
    let r = w
        .app
        .client
        .delete(w.app.url(&path))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = w.app.delete(&path).await;
    assert_eq!(r.status(), 202);
    let page = json_of(
        w.app
            .get(&format!("/api/v1/audit?target={}", w.instances.0))
            .await,
        StatusCode::OK,
    )
    .await;
    let entries = page["entries"].as_array().unwrap();
    let summary: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["actor"]["name"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "instance.terminate".into(),
                "admin token".into(),
                "success".into()
            ),
            (
                "instance.terminate".into(),
                "viewer@example.com".into(),
                "denied".into()
            ),
            (
                "instance.create".into(),
                "admin token".into(),
                "success".into()
            ),
        ]
    );
    assert!(
        entries.iter().all(|e| e["project_id"] == OWN),
        "{entries:?}"
    );
    assert!(
        entries.iter().all(|e| e["source_ip"] == "127.0.0.1"),
        "{entries:?}"
    );
    // Sign-ins, good and bad.
    let page = json_of(
        w.app
            .get("/api/v1/audit?action=auth.sign_in&outcome=denied")
            .await,
        StatusCode::OK,
    )
    .await;
    assert!(page["entries"].as_array().unwrap().is_empty());
    let r = w
        .app
        .client
        .post(w.app.url("/api/v1/auth/login"))
        .json(&json!({"email": "viewer@example.com", "password": "not the password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let page = json_of(
        w.app.get("/api/v1/audit?action=auth.").await,
        StatusCode::OK,
    )
    .await;
    let outcomes: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes[0], "denied");
    assert_eq!(outcomes.iter().filter(|o| **o == "success").count(), 4);
    // The role grants are there, with who granted them.
    let page = json_of(
        w.app.get("/api/v1/audit?action=member.grant").await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 3);
    // A project admin reads their project's entries and their own
    // entries outside projects; a viewer only the latter.
    let as_user = |token: String, query: &'static str| {
        let w = &w;
        async move {
            json_of(
                w.app
                    .client
                    .get(w.app.url(&format!("/api/v1/audit{query}")))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap(),
                StatusCode::OK,
            )
            .await["entries"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    let padmin = w.token(Who::ProjAdmin).unwrap();
    let entries = as_user(padmin.clone(), "").await;
    let in_own = |e: &&Value| e["project_id"] == OWN;
    assert!(entries.iter().any(|e| in_own(&e)), "{entries:?}");
    let outside: Vec<&Value> = entries.iter().filter(|e| !in_own(e)).collect();
    // Made by them, or aimed at them (their account's creation).
    let own_actions = |es: &[&Value], email: &str| -> Vec<String> {
        assert!(
            es.iter().all(|e| e["project_id"].is_null()
                && (e["actor"]["name"] == email || e["message"].as_str().unwrap().contains(email))),
            "only {email}'s own entries outside projects: {es:?}"
        );
        es.iter()
            .map(|e| e["action"].as_str().unwrap().to_string())
            .collect()
    };
    // Made by `World::build`: the user, a password sign-in, a token.
    assert_eq!(
        own_actions(&outside, "padmin@example.com"),
        ["token.create", "auth.sign_in", "user.create"]
    );
    // `?project=` keeps to the project's entries.
    let entries = as_user(padmin, "?project=alpha").await;
    assert!(!entries.is_empty() && entries.iter().all(|e| in_own(&e)));
    let entries = as_user(viewer.clone(), "").await;
    assert_eq!(
        own_actions(&entries.iter().collect::<Vec<_>>(), "viewer@example.com"),
        [
            "auth.sign_in",
            "token.create",
            "auth.sign_in",
            "user.create"
        ],
        "a viewer reads only their own entries, not their project's"
    );
    // The newest: the refused sign-in with their email, above.
    assert_eq!(entries[0]["outcome"], "denied");
    assert_eq!(entries[0]["actor"]["kind"], "anonymous");
    assert!(as_user(viewer, "?project=alpha").await.is_empty());
    // Bad filters name the field.
    for (q, field) in [
        ("outcome=maybe", "outcome"),
        ("limit=0", "limit"),
        ("from=yesterday", "from"),
        ("project=Nope", "project"),
    ] {
        let r = w.app.get(&format!("/api/v1/audit?{q}")).await;
        assert_eq!(
            json_of(r, StatusCode::BAD_REQUEST).await["error"]["field"],
            field,
            "{q}"
        );
    }
}
