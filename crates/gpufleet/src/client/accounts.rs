//! `gpufleet login|logout|whoami`, `gpufleet projects ...`, `gpufleet users
//! ...`, `gpufleet tokens ...` and `gpufleet audit`.
//!
//! `login` signs in with an email and password (or takes a personal access
//! token made in the console, for single-sign-on users), makes a personal
//! access token and keeps it in the credentials file
//! (`$GPUFLEET_CREDENTIALS`, else `$XDG_CONFIG_HOME/gpufleet/credentials.json`,
//! else `~/.config/gpufleet/credentials.json`; mode 0600), one per server.
//! Every client command then uses it unless `--token` names another.

use super::render::table;
use super::{print_json, Client};
use anyhow::{anyhow, bail, Context};
use gpufleet_api::accounts::{CreatedToken, MeView, MemberView, ProjectView, TokenView, UserView};
use gpufleet_api::audit::AuditPage;
use reqwest::{header, Method};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

/// One server's saved credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub token: String,
    pub token_id: Option<String>,
    pub email: Option<String>,
}

/// Where `login` keeps tokens.
pub fn credentials_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUFLEET_CREDENTIALS") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("gpufleet").join("credentials.json"))
}

fn load_all() -> anyhow::Result<BTreeMap<String, Saved>> {
    let Some(path) = credentials_path() else {
        return Ok(BTreeMap::new());
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => serde_json::from_str(&s).with_context(|| {
            format!(
                "{} is not a credentials file; delete it and log in again",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn store_all(all: &BTreeMap<String, Saved>) -> anyhow::Result<PathBuf> {
    let path = credentials_path()
        .ok_or_else(|| anyhow!("no place for credentials: set HOME or GPUFLEET_CREDENTIALS"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(all)?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The saved token for `server`, if any.
pub fn saved_token(server: &str) -> anyhow::Result<Option<String>> {
    Ok(load_all()?.remove(server).map(|s| s.token))
}

#[derive(Debug, Clone, clap::Args)]
pub struct LoginArgs {
    /// Your email address.
    #[arg(long)]
    pub email: Option<String>,
    /// Read the password from standard input (one line) instead of asking.
    #[arg(long)]
    pub password_stdin: bool,
    /// Save this personal access token instead (e.g. one made in the console
    /// by a single-sign-on user); `-` reads it from standard input.
    #[arg(long, conflicts_with_all = ["email", "password_stdin"])]
    pub with_token: Option<String>,
}

/// Read a line from standard input, without echo when it is a terminal.
fn read_secret(prompt: &str) -> anyhow::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    use std::io::IsTerminal as _;
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let saved = if tty {
        eprint!("{prompt}");
        let t = tcgetattr(&stdin).context("cannot read the terminal's settings")?;
        let mut quiet = t.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("cannot turn echo off")?;
        Some(t)
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &t);
        eprintln!();
    }
    read.context("cannot read standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// The value of cookie `name` among a response's `Set-Cookie` headers.
fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

pub async fn login(client: &Client, args: LoginArgs) -> anyhow::Result<()> {
    let (token, token_id, email) = match args.with_token {
        Some(t) => {
            let t = if t == "-" { read_secret("Token: ")? } else { t };
            let t = t.trim().to_string();
            if !t.starts_with("gfp_") {
                bail!("that is not a personal access token (they start with gfp_)\nhint: make one in the console (Account → Tokens) or with `gpufleet tokens create`");
            }
            let me: MeView = client
                .send(client.raw(Method::GET, "/api/v1/auth/me").bearer_auth(&t))
                .await?;
            (t, None, me.user.map(|u| u.email))
        }
        None => {
            let email = match args.email {
                Some(e) => e,
                None => bail!("name yourself with --email\nhint: single-sign-on users make a token in the console and run `gpufleet login --with-token -`"),
            };
            let password = read_secret("Password: ")?;
            if password.is_empty() {
                bail!(
                    "no password given\nhint: type it when asked, or pipe it with --password-stdin"
                );
            }
            let resp = client
                .raw(Method::POST, "/api/v1/auth/login")
                .json(&json!({"email": email, "password": password}))
                .send()
                .await
                .map_err(|e| client.transport_error(e))?;
            let resp = client.check(resp).await?;
            let session = set_cookie(&resp, "gpufleet_session")
                .ok_or_else(|| anyhow!("the server set no session cookie"))?;
            let csrf = set_cookie(&resp, "gpufleet_csrf")
                .ok_or_else(|| anyhow!("the server set no CSRF cookie"))?;
            let cookie = format!("gpufleet_session={session}; gpufleet_csrf={csrf}");
            let host = std::process::Command::new("hostname")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "this machine".into());
            let created: CreatedToken = client
                .send(
                    client
                        .raw(Method::POST, "/api/v1/tokens")
                        .header(header::COOKIE, &cookie)
                        .header("x-csrf-token", &csrf)
                        .json(&json!({"name": format!("gpufleet CLI on {host}")})),
                )
                .await?;
            // The token is what the CLI keeps; the session is not needed.
            let _ = client
                .raw(Method::POST, "/api/v1/auth/logout")
                .header(header::COOKIE, &cookie)
                .header("x-csrf-token", &csrf)
                .send()
                .await;
            (
                created.token,
                Some(created.view.id.to_string()),
                Some(email),
            )
        }
    };
    let mut all = load_all()?;
    all.insert(
        client.base().to_string(),
        Saved {
            token,
            token_id,
            email: email.clone(),
        },
    );
    let path = store_all(&all)?;
    println!(
        "logged in to {} as {} (token saved in {})",
        client.base(),
        email.as_deref().unwrap_or("?"),
        path.display()
    );
    Ok(())
}

pub async fn logout(client: &Client) -> anyhow::Result<()> {
    let mut all = load_all()?;
    let Some(saved) = all.remove(client.base()) else {
        println!("not logged in to {}", client.base());
        return Ok(());
    };
    if let Some(id) = &saved.token_id {
        let resp = client
            .raw(Method::DELETE, &format!("/api/v1/tokens/{id}"))
            .bearer_auth(&saved.token)
            .send()
            .await;
        if let Err(e) = resp {
            eprintln!("warning: could not revoke the token on the server: {e}");
        }
    }
    store_all(&all)?;
    println!("logged out of {}", client.base());
    Ok(())
}

pub async fn whoami(client: &Client) -> anyhow::Result<()> {
    let me: MeView = client.get("/api/v1/auth/me").await?;
    if client.json {
        return print_json(&me);
    }
    match &me.user {
        None => println!("the admin token (every project)"),
        Some(u) => {
            println!("{} <{}> ({})", u.display_name, u.email, u.id);
            if me.memberships.is_empty() {
                println!("no role in any project yet; ask a project admin");
            }
            for m in &me.memberships {
                println!("  {}: {}", m.project_id, m.role);
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum ProjectsCommand {
    /// The projects you have a role in (the admin token: all).
    List,
    /// Create a project (the admin token only).
    Create {
        /// Lower-case letters, digits and dashes.
        id: String,
    },
    /// A project's members and their roles.
    Members { project: String },
    /// Grant a role (admin, operator, viewer) to a user, by email.
    Grant {
        project: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        role: String,
    },
    /// Take a user's role away.
    Revoke {
        project: String,
        #[arg(long)]
        user: String,
    },
}

/// A user's id from an email (or an id given as is).
async fn user_id(client: &Client, user: &str) -> anyhow::Result<String> {
    if user.starts_with("us-") {
        return Ok(user.to_string());
    }
    let users: Vec<UserView> = client.get("/api/v1/users").await?;
    users
        .into_iter()
        .find(|u| u.email.eq_ignore_ascii_case(user))
        .map(|u| u.id.to_string())
        .ok_or_else(|| {
            anyhow!("no user with email {user}\nhint: list them with `gpufleet users list`; single-sign-on users exist once they signed in")
        })
}

pub async fn projects(client: &Client, cmd: ProjectsCommand) -> anyhow::Result<()> {
    match cmd {
        ProjectsCommand::List => {
            let list: Vec<ProjectView> = client.get("/api/v1/projects").await?;
            if client.json {
                return print_json(&list);
            }
            let mut t = table(&["PROJECT", "YOUR ROLE", "CREATED"]);
            for p in &list {
                t.add_row(vec![
                    p.id.to_string(),
                    p.role.to_string(),
                    p.created_at.format("%Y-%m-%d %H:%M").to_string(),
                ]);
            }
            println!("{t}");
        }
        ProjectsCommand::Create { id } => {
            let p: ProjectView = client.post("/api/v1/projects", &json!({"id": id})).await?;
            if client.json {
                return print_json(&p);
            }
            println!("created project {}", p.id);
        }
        ProjectsCommand::Members { project } => {
            let list: Vec<MemberView> = client
                .get(&format!("/api/v1/projects/{project}/members"))
                .await?;
            if client.json {
                return print_json(&list);
            }
            let mut t = table(&["USER", "EMAIL", "ROLE", "GRANTED BY", "GRANTED"]);
            for m in &list {
                t.add_row(vec![
                    m.user.id.to_string(),
                    m.user.email.clone(),
                    m.role.to_string(),
                    m.granted_by.clone(),
                    m.granted_at.format("%Y-%m-%d %H:%M").to_string(),
                ]);
            }
            println!("{t}");
        }
        ProjectsCommand::Grant {
            project,
            user,
            role,
        } => {
            let id = user_id(client, &user).await?;
            let m: MemberView = client
                .send(
                    client
                        .request(
                            Method::PUT,
                            &format!("/api/v1/projects/{project}/members/{id}"),
                        )
                        .json(&json!({"role": role})),
                )
                .await?;
            if client.json {
                return print_json(&m);
            }
            println!("{} is {} in {project}", m.user.email, m.role);
        }
        ProjectsCommand::Revoke { project, user } => {
            let id = user_id(client, &user).await?;
            let resp = client
                .request(
                    Method::DELETE,
                    &format!("/api/v1/projects/{project}/members/{id}"),
                )
                .send()
                .await
                .map_err(|e| client.transport_error(e))?;
            client.check(resp).await?;
            println!("{user} has no role in {project} any more");
        }
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum UsersCommand {
    /// Every user (the admin token or a project admin).
    List,
    /// Create a user (the admin token only).
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        /// Read a password from standard input; without it the user signs in
        /// with single sign-on only.
        #[arg(long)]
        password_stdin: bool,
    },
}

pub async fn users(client: &Client, cmd: UsersCommand) -> anyhow::Result<()> {
    match cmd {
        UsersCommand::List => {
            let list: Vec<UserView> = client.get("/api/v1/users").await?;
            if client.json {
                return print_json(&list);
            }
            let mut t = table(&["ID", "EMAIL", "NAME", "PASSWORD", "SSO"]);
            for u in &list {
                t.add_row(vec![
                    u.id.to_string(),
                    u.email.clone(),
                    u.display_name.clone(),
                    if u.has_password { "yes" } else { "no" }.into(),
                    if u.sso { "yes" } else { "no" }.into(),
                ]);
            }
            println!("{t}");
        }
        UsersCommand::Create {
            email,
            name,
            password_stdin,
        } => {
            let password = if password_stdin {
                Some(read_secret("Password: ")?)
            } else {
                None
            };
            let u: UserView = client
                .post(
                    "/api/v1/users",
                    &json!({"email": email, "display_name": name, "password": password}),
                )
                .await?;
            if client.json {
                return print_json(&u);
            }
            println!("created user {} ({})", u.email, u.id);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokensCommand {
    /// Your personal access tokens.
    List,
    /// Make a token; its secret is printed this once.
    Create {
        name: String,
        /// Days until it stops working; none: never.
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// Revoke one of your tokens.
    Revoke { id: String },
}

pub async fn tokens(client: &Client, cmd: TokensCommand) -> anyhow::Result<()> {
    match cmd {
        TokensCommand::List => {
            let list: Vec<TokenView> = client.get("/api/v1/tokens").await?;
            if client.json {
                return print_json(&list);
            }
            let mut t = table(&["ID", "NAME", "CREATED", "EXPIRES", "LAST USED", "REVOKED"]);
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            for k in &list {
                t.add_row(vec![
                    k.id.to_string(),
                    k.name.clone(),
                    when(Some(k.created_at)),
                    when(k.expires_at),
                    when(k.last_used_at),
                    when(k.revoked_at),
                ]);
            }
            println!("{t}");
        }
        TokensCommand::Create {
            name,
            expires_in_days,
        } => {
            let created: CreatedToken = client
                .post(
                    "/api/v1/tokens",
                    &json!({"name": name, "expires_in_days": expires_in_days}),
                )
                .await?;
            if client.json {
                return print_json(&created);
            }
            println!("created token {} ({})", created.view.id, created.view.name);
            println!("token: {}", created.token);
            println!("(shown only now; use it as `Authorization: Bearer <token>` or `gpufleet login --with-token -`)");
        }
        TokensCommand::Revoke { id } => {
            let resp = client
                .request(Method::DELETE, &format!("/api/v1/tokens/{id}"))
                .send()
                .await
                .map_err(|e| client.transport_error(e))?;
            client.check(resp).await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// A user's email or id, or "admin token".
    #[arg(long)]
    pub actor: Option<String>,
    /// An action (instance.terminate) or a prefix ending in "." (instance.).
    #[arg(long)]
    pub action: Option<String>,
    /// A target's id.
    #[arg(long)]
    pub target: Option<String>,
    #[arg(long)]
    pub project: Option<String>,
    /// success, denied or failure.
    #[arg(long)]
    pub outcome: Option<String>,
    /// How far back, e.g. 1h, 7d.
    #[arg(long, value_parser = super::instances::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// At most this many entries.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

pub async fn audit(client: &Client, args: AuditArgs) -> anyhow::Result<()> {
    let mut q: Vec<(&str, String)> = vec![("limit", args.limit.to_string())];
    for (k, v) in [
        ("actor", args.actor),
        ("action", args.action),
        ("target", args.target),
        ("project", args.project),
        ("outcome", args.outcome),
    ] {
        if let Some(v) = v {
            q.push((k, v));
        }
    }
    if let Some(d) = args.since {
        let from = chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or_default();
        q.push((
            "from",
            from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ));
    }
    let query = serde_urlencoded::to_string(&q)?;
    let page: AuditPage = client.get(&format!("/api/v1/audit?{query}")).await?;
    if client.json {
        return print_json(&page);
    }
    let mut t = table(&[
        "TIME", "ACTOR", "ACTION", "TARGET", "PROJECT", "OUTCOME", "MESSAGE",
    ]);
    for e in &page.entries {
        t.add_row(vec![
            e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
            e.actor.name.clone(),
            e.action.clone(),
            e.target.id.clone().unwrap_or_else(|| "-".into()),
            e.project_id
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            format!("{:?}", e.outcome).to_lowercase(),
            e.message.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}
