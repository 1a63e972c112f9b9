//! Projects, users and their roles, console sessions, personal access
//! tokens, and the audit log. Secrets (session cookies, CSRF tokens, access
//! tokens) are stored as SHA-256 digests only; passwords as argon2 PHC
//! strings made by the caller.

use crate::rows::{is_unique_violation, millis, millis_opt, RowReader};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_domain::{AccessTokenId, ActorKind, AuditOutcome, ProjectId, Role, UserId};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

/// A project as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectRecord {
    pub id: ProjectId,
    pub created_at: DateTime<Utc>,
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub id: UserId,
    /// Lower-case.
    pub email: String,
    pub display_name: String,
    /// argon2 PHC string; `None`: single sign-on only.
    pub password_hash: Option<String>,
    pub oidc_issuer: Option<String>,
    pub oidc_subject: Option<String>,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

/// A role held in a project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Membership {
    pub project_id: ProjectId,
    pub user_id: UserId,
    pub role: Role,
    pub granted_at: DateTime<Utc>,
    /// Who granted it (an actor name).
    pub granted_by: String,
}

/// A console session as stored (found by the digest of its cookie).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub token_hash: String,
    pub user_id: UserId,
    pub csrf_hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

/// A personal access token as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessTokenRecord {
    pub id: AccessTokenId,
    pub user_id: UserId,
    pub name: String,
    pub token_hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// An audit entry to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAuditEntry {
    pub at: DateTime<Utc>,
    pub actor_kind: ActorKind,
    pub actor_id: Option<String>,
    /// The user's email, `admin token`, or what an anonymous caller gave.
    pub actor_name: String,
    /// e.g. `instance.create`.
    pub action: String,
    /// e.g. `instance`.
    pub target_kind: String,
    pub target_id: Option<String>,
    pub project_id: Option<ProjectId>,
    pub outcome: AuditOutcome,
    /// The HTTP status answered.
    pub status: u16,
    pub message: String,
    pub source_ip: Option<String>,
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    #[serde(flatten)]
    pub entry: NewAuditEntry,
}

/// Which audit entries to read (all conditions together), newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    /// Actor id or name (exact).
    pub actor: Option<String>,
    /// Exact action, or a prefix ending in `.` (`instance.`).
    pub action: Option<String>,
    /// Target id (exact).
    pub target: Option<String>,
    /// Only these projects (`None`: all; entries without a project are
    /// only in `None`, or through `own`).
    pub projects: Option<Vec<ProjectId>>,
    /// With `projects`: also the entries without a project that this id
    /// made or aimed at (a user's own sign-ins, refused ones too, and
    /// access tokens).
    pub own: Option<String>,
    pub outcome: Option<AuditOutcome>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Only entries with an id below this (paging).
    pub before: Option<i64>,
    pub limit: i64,
}

const USER_COLUMNS: &str = "id, email, display_name, password_hash, oidc_issuer, oidc_subject, \
     created_at, disabled_at";
const TOKEN_COLUMNS: &str =
    "id, user_id, name, token_hash, created_at, expires_at, last_used_at, revoked_at";

fn decode_user(row: &AnyRow) -> Result<UserRecord, StoreError> {
    let mut r = RowReader::new(row, "users row");
    let id: UserId = r.parsed("id")?;
    r.set_ctx(format!("users row {id}"));
    Ok(UserRecord {
        id,
        email: r.get("email")?,
        display_name: r.get("display_name")?,
        password_hash: r.get("password_hash")?,
        oidc_issuer: r.get("oidc_issuer")?,
        oidc_subject: r.get("oidc_subject")?,
        created_at: r.time("created_at")?,
        disabled_at: r.time_opt("disabled_at")?,
    })
}

fn decode_project(row: &AnyRow) -> Result<ProjectRecord, StoreError> {
    let r = RowReader::new(row, "projects row");
    Ok(ProjectRecord {
        id: r.parsed("id")?,
        created_at: r.time("created_at")?,
    })
}

fn decode_member(row: &AnyRow) -> Result<Membership, StoreError> {
    let r = RowReader::new(row, "project_members row");
    Ok(Membership {
        project_id: r.parsed("project_id")?,
        user_id: r.parsed("user_id")?,
        role: r.parsed("role")?,
        granted_at: r.time("granted_at")?,
        granted_by: r.get("granted_by")?,
    })
}

fn decode_token(row: &AnyRow) -> Result<AccessTokenRecord, StoreError> {
    let mut r = RowReader::new(row, "access_tokens row");
    let id: AccessTokenId = r.parsed("id")?;
    r.set_ctx(format!("access_tokens row {id}"));
    Ok(AccessTokenRecord {
        id,
        user_id: r.parsed("user_id")?,
        name: r.get("name")?,
        token_hash: r.get("token_hash")?,
        created_at: r.time("created_at")?,
        expires_at: r.time_opt("expires_at")?,
        last_used_at: r.time_opt("last_used_at")?,
        revoked_at: r.time_opt("revoked_at")?,
    })
}

fn decode_audit(row: &AnyRow) -> Result<AuditEntry, StoreError> {
    let mut r = RowReader::new(row, "audit_log row");
    let id: i64 = r.get("id")?;
    r.set_ctx(format!("audit_log row {id}"));
    Ok(AuditEntry {
        id,
        entry: NewAuditEntry {
            at: r.time("at")?,
            actor_kind: r.parsed("actor_kind")?,
            actor_id: r.get("actor_id")?,
            actor_name: r.get("actor_name")?,
            action: r.get("action")?,
            target_kind: r.get("target_kind")?,
            target_id: r.get("target_id")?,
            project_id: r.parsed_opt("project_id")?,
            outcome: r.parsed("outcome")?,
            status: r.int("status")?,
            message: r.get("message")?,
            source_ip: r.get("source_ip")?,
        },
    })
}

impl Store {
    // ---- projects ----

    /// Create a project; `Ok(None)` if one with this id exists.
    pub async fn insert_project(
        &self,
        id: &ProjectId,
        at: DateTime<Utc>,
    ) -> Result<Option<ProjectRecord>, StoreError> {
        match sqlx::query("INSERT INTO projects (id, created_at) VALUES ($1, $2)")
            .bind(id.as_str())
            .bind(millis(at))
            .execute(&self.pool)
            .await
        {
            Ok(_) => Ok(Some(ProjectRecord {
                id: id.clone(),
                created_at: at,
            })),
            Err(e) if is_unique_violation(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every project, by id.
    pub async fn list_projects(&self) -> Result<Vec<ProjectRecord>, StoreError> {
        let rows = sqlx::query("SELECT id, created_at FROM projects ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_project).collect()
    }

    pub async fn get_project(&self, id: &ProjectId) -> Result<Option<ProjectRecord>, StoreError> {
        let row = sqlx::query("SELECT id, created_at FROM projects WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode_project).transpose()
    }

    // ---- users ----

    /// Create a user; `Ok(None)` if the email (or the SSO identity) is taken.
    pub async fn insert_user(&self, u: &UserRecord) -> Result<Option<UserRecord>, StoreError> {
        let res = sqlx::query(
            "INSERT INTO users (id, email, display_name, password_hash, oidc_issuer, \
             oidc_subject, created_at, disabled_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(u.id.to_string())
        .bind(u.email.to_lowercase())
        .bind(u.display_name.as_str())
        .bind(u.password_hash.as_deref())
        .bind(u.oidc_issuer.as_deref())
        .bind(u.oidc_subject.as_deref())
        .bind(millis(u.created_at))
        .bind(millis_opt(u.disabled_at))
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(self.get_user(u.id).await?),
            Err(e) if is_unique_violation(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get_user(&self, id: UserId) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode_user).transpose()
    }

    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE email = $1"
        ))
        .bind(email.to_lowercase())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_user).transpose()
    }

    pub async fn user_by_oidc(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE oidc_issuer = $1 AND oidc_subject = $2"
        ))
        .bind(issuer)
        .bind(subject)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_user).transpose()
    }

    /// Link an SSO identity to an existing user (first SSO sign-in of a
    /// user created with a password).
    pub async fn link_user_oidc(
        &self,
        id: UserId,
        issuer: &str,
        subject: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE users SET oidc_issuer = $2, oidc_subject = $3 WHERE id = $1")
            .bind(id.to_string())
            .bind(issuer)
            .bind(subject)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every user, by email.
    pub async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users ORDER BY email"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_user).collect()
    }

    // ---- memberships ----

    /// Grant (or change) a user's role in a project.
    pub async fn upsert_member(&self, m: &Membership) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO project_members (project_id, user_id, role, granted_at, granted_by) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project_id, user_id) DO UPDATE SET \
             role = excluded.role, granted_at = excluded.granted_at, granted_by = excluded.granted_by",
        )
        .bind(m.project_id.as_str())
        .bind(m.user_id.to_string())
        .bind(m.role.as_str())
        .bind(millis(m.granted_at))
        .bind(m.granted_by.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Remove a user's role in a project; whether there was one.
    pub async fn delete_member(
        &self,
        project: &ProjectId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
            .bind(project.as_str())
            .bind(user.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// A user's roles, by project.
    pub async fn memberships_of(&self, user: UserId) -> Result<Vec<Membership>, StoreError> {
        let rows = sqlx::query(
            "SELECT project_id, user_id, role, granted_at, granted_by FROM project_members \
             WHERE user_id = $1 ORDER BY project_id",
        )
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_member).collect()
    }

    /// A project's members, by user id.
    pub async fn members_of(&self, project: &ProjectId) -> Result<Vec<Membership>, StoreError> {
        let rows = sqlx::query(
            "SELECT project_id, user_id, role, granted_at, granted_by FROM project_members \
             WHERE project_id = $1 ORDER BY user_id",
        )
        .bind(project.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_member).collect()
    }

    // ---- sessions ----

    pub async fn insert_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sessions (token_hash, user_id, csrf_hash, created_at, expires_at, \
             last_seen_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(s.token_hash.as_str())
        .bind(s.user_id.to_string())
        .bind(s.csrf_hash.as_str())
        .bind(millis(s.created_at))
        .bind(millis(s.expires_at))
        .bind(millis(s.last_seen_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The session whose cookie has this digest, if it has not expired at `now`.
    pub async fn session_by_hash(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT token_hash, user_id, csrf_hash, created_at, expires_at, last_seen_at \
             FROM sessions WHERE token_hash = $1 AND expires_at > $2",
        )
        .bind(token_hash)
        .bind(millis(now))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(|row| {
                let r = RowReader::new(row, "sessions row");
                Ok(SessionRecord {
                    token_hash: r.get("token_hash")?,
                    user_id: r.parsed("user_id")?,
                    csrf_hash: r.get("csrf_hash")?,
                    created_at: r.time("created_at")?,
                    expires_at: r.time("expires_at")?,
                    last_seen_at: r.time("last_seen_at")?,
                })
            })
            .transpose()
    }

    pub async fn delete_session(&self, token_hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forget sessions expired before `now`; how many.
    pub async fn delete_expired_sessions(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(millis(now))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    // ---- personal access tokens ----

    pub async fn insert_access_token(&self, t: &AccessTokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO access_tokens (id, user_id, name, token_hash, created_at, expires_at, \
             last_used_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)",
        )
        .bind(t.id.to_string())
        .bind(t.user_id.to_string())
        .bind(t.name.as_str())
        .bind(t.token_hash.as_str())
        .bind(millis(t.created_at))
        .bind(millis_opt(t.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The token with this digest, revoked or expired ones too.
    pub async fn access_token_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<AccessTokenRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM access_tokens WHERE token_hash = $1"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_token).transpose()
    }

    /// A user's tokens, oldest first.
    pub async fn access_tokens_of(
        &self,
        user: UserId,
    ) -> Result<Vec<AccessTokenRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM access_tokens WHERE user_id = $1 ORDER BY created_at, id"
        ))
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_token).collect()
    }

    /// Revoke one of `user`'s tokens; whether it was theirs (and live).
    pub async fn revoke_access_token(
        &self,
        user: UserId,
        id: AccessTokenId,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE access_tokens SET revoked_at = $3 \
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(id.to_string())
        .bind(user.to_string())
        .bind(millis(at))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn touch_access_token(
        &self,
        id: AccessTokenId,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE access_tokens SET last_used_at = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(millis(at))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- audit ----

    pub async fn append_audit(&self, e: &NewAuditEntry) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor_kind, actor_id, actor_name, action, target_kind, \
             target_id, project_id, outcome, status, message, source_ip) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(millis(e.at))
        .bind(e.actor_kind.as_str())
        .bind(e.actor_id.as_deref())
        .bind(e.actor_name.as_str())
        .bind(e.action.as_str())
        .bind(e.target_kind.as_str())
        .bind(e.target_id.as_deref())
        .bind(e.project_id.as_ref().map(|p| p.as_str().to_string()))
        .bind(e.outcome.as_str())
        .bind(i64::from(e.status))
        .bind(e.message.as_str())
        .bind(e.source_ip.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Audit entries matching `f`, newest first.
    pub async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let mut conds: Vec<String> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let mut ints: Vec<i64> = Vec::new();
        // Text parameters first ($1..), then integers.
        let mut text = |conds: &mut Vec<String>, sql: &str, v: String| {
            texts.push(v);
            conds.push(sql.replace('?', &format!("${}", texts.len())));
        };
        if let Some(a) = &f.actor {
            text(&mut conds, "(actor_id = ? OR actor_name = ?)", a.clone());
        }
        if let Some(a) = &f.action {
            if let Some(prefix) = a.strip_suffix('.') {
                text(&mut conds, "action LIKE ?", format!("{prefix}.%"));
            } else {
                text(&mut conds, "action = ?", a.clone());
            }
        }
        if let Some(t) = &f.target {
            text(&mut conds, "target_id = ?", t.clone());
        }
        if let Some(o) = f.outcome {
            text(&mut conds, "outcome = ?", o.as_str().to_string());
        }
        if let Some(ps) = &f.projects {
            let mut any: Vec<String> = Vec::new();
            if !ps.is_empty() {
                let mut ph = Vec::new();
                for p in ps {
                    texts.push(p.as_str().to_string());
                    ph.push(format!("${}", texts.len()));
                }
                any.push(format!("project_id IN ({})", ph.join(", ")));
            }
            if let Some(me) = &f.own {
                texts.push(me.clone());
                texts.push(me.clone());
                any.push(format!(
                    "(project_id IS NULL AND (actor_id = ${} OR target_id = ${}))",
                    texts.len() - 1,
                    texts.len()
                ));
            }
            conds.push(if any.is_empty() {
                "1 = 0".into()
            } else {
                format!("({})", any.join(" OR "))
            });
        }
        let mut int = |conds: &mut Vec<String>, sql: &str, v: i64, n: usize| {
            ints.push(v);
            conds.push(sql.replace('?', &format!("${}", n + ints.len())));
        };
        let n = texts.len();
        if let Some(from) = f.from {
            int(&mut conds, "at >= ?", millis(from), n);
        }
        if let Some(to) = f.to {
            int(&mut conds, "at < ?", millis(to), n);
        }
        if let Some(b) = f.before {
            int(&mut conds, "id < ?", b, n);
        }
        let mut sql = String::from(
            "SELECT id, at, actor_kind, actor_id, actor_name, action, target_kind, target_id, \
             project_id, outcome, status, message, source_ip FROM audit_log",
        );
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(&format!(
            " ORDER BY id DESC LIMIT ${}",
            texts.len() + ints.len() + 1
        ));
        let mut q = sqlx::query(&sql);
        for t in &texts {
            q = q.bind(t.as_str());
        }
        for i in &ints {
            q = q.bind(*i);
        }
        q = q.bind(f.limit.max(0));
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(decode_audit).collect()
    }
}
