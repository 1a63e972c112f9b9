//! Accounts: users (local passwords, argon2id; or single sign-on),
//! projects and roles, console sessions, personal access tokens, and the
//! audit log. What each role may do is [`gpufleet_domain::Role::allows`];
//! the API edge asks [`Accounts`] who a caller is and checks that.

use crate::error::ControlError;
use crate::secrets::{digest, generate};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::{DateTime, Duration, Utc};
use gpufleet_domain::{AccessTokenId, ProjectId, Role, UserId};
use gpufleet_store::{
    AccessTokenRecord, AuditEntry, AuditFilter, Membership, NewAuditEntry, ProjectRecord,
    SessionRecord, Store, UserRecord,
};
use std::collections::BTreeMap;

/// Prefix of personal access tokens (`gfp_` + 64 hex digits).
pub const ACCESS_TOKEN_PREFIX: &str = "gfp_";
/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest password accepted (argon2 takes any, but a megabyte is abuse).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// A signed-in user and their roles.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedInUser {
    pub user: UserRecord,
    pub roles: BTreeMap<ProjectId, Role>,
}

/// A new console session: the cookie's secret and the CSRF token, shown
/// once (only their digests are stored).
#[derive(Debug, Clone)]
pub struct NewSession {
    pub token: String,
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
    pub user: SignedInUser,
}

/// What a session cookie resolves to.
#[derive(Debug, Clone)]
pub struct ResolvedSession {
    pub user: SignedInUser,
    /// SHA-256 hex of the session's CSRF token.
    pub csrf_hash: String,
}

/// A new personal access token: its secret, shown once.
#[derive(Debug, Clone)]
pub struct NewAccessToken {
    pub token: String,
    pub record: AccessTokenRecord,
}

/// An identity a single sign-on issuer vouched for.
#[derive(Debug, Clone, PartialEq)]
pub struct SsoIdentity {
    pub issuer: String,
    pub subject: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub name: Option<String>,
}

/// Users, projects, roles, sessions, tokens and the audit log. Cheap to clone.
#[derive(Clone)]
pub struct Accounts {
    store: Store,
    session_ttl: Duration,
    /// HMAC key of sealed cookies (derived from the store's secret key, so
    /// every replica reads what another sealed).
    cookie_key: std::sync::Arc<[u8; 32]>,
}

fn hasher() -> Argon2<'static> {
    // argon2id with the crate's defaults (RFC 9106's second recommended
    // set: m = 19 MiB, t = 2, p = 1).
    Argon2::default()
}

/// The argon2id PHC string of `password`.
pub fn hash_password(password: &str) -> Result<String, ControlError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ControlError::invalid("password", format!("cannot hash it: {e}")))
}

fn check_password_rules(password: &str) -> Result<(), ControlError> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_LEN {
        return Err(ControlError::invalid(
            "password",
            format!("must have at least {MIN_PASSWORD_LEN} characters"),
        ));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(ControlError::invalid(
            "password",
            format!("must have at most {MAX_PASSWORD_LEN} bytes"),
        ));
    }
    Ok(())
}

/// A plausible email address: something@domain, no spaces, ≤ 254 bytes.
fn check_email(email: &str) -> Result<String, ControlError> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && !e.chars().any(char::is_whitespace)
        && e.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.')
        });
    if ok {
        Ok(e)
    } else {
        Err(ControlError::invalid(
            "email",
            format!("{email:?} is not an email address"),
        ))
    }
}

impl Accounts {
    pub fn new(store: Store, session_ttl: std::time::Duration, secret_key: &str) -> Self {
        use hmac::{Mac, SimpleHmac};
        let mut mac = <SimpleHmac<sha2::Sha256> as Mac>::new_from_slice(secret_key.as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(b"gpufleet sealed cookies v1");
        Self {
            store,
            session_ttl: Duration::from_std(session_ttl).unwrap_or(Duration::hours(12)),
            cookie_key: std::sync::Arc::new(mac.finalize().into_bytes().into()),
        }
    }

    /// `payload` with an HMAC, for a cookie the browser keeps but must not
    /// change (`base64url(payload).hex(hmac)`).
    pub fn seal(&self, payload: &[u8]) -> String {
        use base64::Engine as _;
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
        format!("{body}.{}", hex::encode(self.mac(body.as_bytes())))
    }

    /// What [`Accounts::seal`] sealed; `None` if it was changed.
    pub fn unseal(&self, sealed: &str) -> Option<Vec<u8>> {
        use base64::Engine as _;
        let (body, mac) = sealed.rsplit_once('.')?;
        let want = hex::encode(self.mac(body.as_bytes()));
        if !crate::secrets::constant_time_eq(&want, mac) {
            return None;
        }
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .ok()
    }

    fn mac(&self, data: &[u8]) -> [u8; 32] {
        use hmac::{Mac, SimpleHmac};
        let mut mac = <SimpleHmac<sha2::Sha256> as Mac>::new_from_slice(&self.cookie_key[..])
            .expect("HMAC takes keys of any length");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// The same accounts, with sessions lasting `ttl`.
    pub fn with_session_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.session_ttl = Duration::from_std(ttl).unwrap_or(self.session_ttl);
        self
    }

    pub fn session_ttl(&self) -> std::time::Duration {
        self.session_ttl.to_std().unwrap_or_default()
    }

    async fn signed_in(&self, user: UserRecord) -> Result<SignedInUser, ControlError> {
        let roles = self
            .store
            .memberships_of(user.id)
            .await?
            .into_iter()
            .map(|m| (m.project_id, m.role))
            .collect();
        Ok(SignedInUser { user, roles })
    }

    // ---- users ----

    /// Create a local user (a password) or a single-sign-on-only one (none).
    pub async fn create_user(
        &self,
        email: &str,
        display_name: &str,
        password: Option<&str>,
    ) -> Result<UserRecord, ControlError> {
        let email = check_email(email)?;
        let display_name = display_name.trim();
        if display_name.is_empty() || display_name.chars().count() > 100 {
            return Err(ControlError::invalid(
                "display_name",
                "must have 1 to 100 characters",
            ));
        }
        let password_hash = match password {
            Some(p) => {
                check_password_rules(p)?;
                Some(hash_password(p)?)
            }
            None => None,
        };
        let rec = UserRecord {
            id: UserId::new(),
            email: email.clone(),
            display_name: display_name.to_string(),
            password_hash,
            oidc_issuer: None,
            oidc_subject: None,
            created_at: Utc::now(),
            disabled_at: None,
        };
        self.store
            .insert_user(&rec)
            .await?
            .ok_or_else(|| ControlError::Conflict {
                message: format!("a user with email {email} exists"),
            })
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>, ControlError> {
        Ok(self.store.list_users().await?)
    }

    pub async fn get_user(&self, id: UserId) -> Result<UserRecord, ControlError> {
        self.store
            .get_user(id)
            .await?
            .ok_or_else(|| ControlError::not_found("user", id))
    }

    /// The user with this email and password; `Unauthorized` otherwise
    /// (the same answer for an unknown email, a wrong password, a disabled
    /// user and a user without a password, so none of them can be told apart).
    pub async fn check_password(
        &self,
        email: &str,
        password: &str,
    ) -> Result<SignedInUser, ControlError> {
        let denied = || ControlError::Unauthorized {
            message: "wrong email or password".into(),
        };
        if password.len() > MAX_PASSWORD_LEN {
            return Err(denied());
        }
        let user = self.store.user_by_email(email.trim()).await?;
        // Hash even when there is no user, so timing does not tell.
        let phc = user
            .as_ref()
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| DUMMY_HASH.to_string());
        let pw = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&phc)
                .map(|h| hasher().verify_password(pw.as_bytes(), &h).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        match user {
            Some(u) if ok && u.password_hash.is_some() && u.disabled_at.is_none() => {
                self.signed_in(u).await
            }
            _ => Err(denied()),
        }
    }

    /// The user a single sign-on identity belongs to: found by issuer and
    /// subject, else by verified email (and linked), else created (with no
    /// roles until granted).
    pub async fn sso_user(&self, id: &SsoIdentity) -> Result<SignedInUser, ControlError> {
        if let Some(u) = self.store.user_by_oidc(&id.issuer, &id.subject).await? {
            if u.disabled_at.is_some() {
                return Err(ControlError::Unauthorized {
                    message: "this user is disabled".into(),
                });
            }
            return self.signed_in(u).await;
        }
        let email = id.email.as_deref().filter(|_| id.email_verified);
        if let Some(email) = email {
            if let Some(u) = self.store.user_by_email(email).await? {
                if u.disabled_at.is_some() {
                    return Err(ControlError::Unauthorized {
                        message: "this user is disabled".into(),
                    });
                }
                if u.oidc_subject.is_none() {
                    self.store
                        .link_user_oidc(u.id, &id.issuer, &id.subject)
                        .await?;
                    return self.signed_in(u).await;
                }
            }
        }
        let email = match email {
            Some(e) => check_email(e)?,
            None => {
                return Err(ControlError::Unauthorized {
                    message: "the identity provider gave no verified email (for an issuer that never sends email_verified, an administrator may set [auth.oidc] trust_email)".into(),
                })
            }
        };
        let rec = UserRecord {
            id: UserId::new(),
            email: email.clone(),
            display_name: id.name.clone().unwrap_or_else(|| email.clone()),
            password_hash: None,
            oidc_issuer: Some(id.issuer.clone()),
            oidc_subject: Some(id.subject.clone()),
            created_at: Utc::now(),
            disabled_at: None,
        };
        let u = self
            .store
            .insert_user(&rec)
            .await?
            .ok_or_else(|| ControlError::Conflict {
                message: format!("a user with email {email} exists with another sign-on identity"),
            })?;
        self.signed_in(u).await
    }

    // ---- projects and roles ----

    pub async fn create_project(&self, id: &ProjectId) -> Result<ProjectRecord, ControlError> {
        self.store
            .insert_project(id, Utc::now())
            .await?
            .ok_or_else(|| ControlError::Conflict {
                message: format!("project {id} exists"),
            })
    }

    pub async fn list_projects(&self) -> Result<Vec<ProjectRecord>, ControlError> {
        Ok(self.store.list_projects().await?)
    }

    pub async fn get_project(&self, id: &ProjectId) -> Result<Option<ProjectRecord>, ControlError> {
        Ok(self.store.get_project(id).await?)
    }

    pub async fn project_exists(&self, id: &ProjectId) -> Result<bool, ControlError> {
        Ok(self.get_project(id).await?.is_some())
    }

    pub async fn members(&self, project: &ProjectId) -> Result<Vec<Membership>, ControlError> {
        Ok(self.store.members_of(project).await?)
    }

    /// Grant `role` in `project` to `user` (replacing the one held).
    pub async fn grant(
        &self,
        project: &ProjectId,
        user: UserId,
        role: Role,
        granted_by: &str,
    ) -> Result<Membership, ControlError> {
        self.get_user(user).await?;
        let m = Membership {
            project_id: project.clone(),
            user_id: user,
            role,
            granted_at: Utc::now(),
            granted_by: granted_by.to_string(),
        };
        self.store.upsert_member(&m).await?;
        Ok(m)
    }

    /// Take `user`'s role in `project` away; `NotFound` if none.
    pub async fn revoke(&self, project: &ProjectId, user: UserId) -> Result<(), ControlError> {
        if self.store.delete_member(project, user).await? {
            Ok(())
        } else {
            Err(ControlError::not_found("member", user))
        }
    }

    // ---- sessions ----

    pub async fn start_session(&self, user: SignedInUser) -> Result<NewSession, ControlError> {
        let token = generate("gfs_");
        let csrf = generate("");
        let now = Utc::now();
        let expires_at = now + self.session_ttl;
        self.store
            .insert_session(&SessionRecord {
                token_hash: digest(&token),
                user_id: user.user.id,
                csrf_hash: digest(&csrf),
                created_at: now,
                expires_at,
                last_seen_at: now,
            })
            .await?;
        // Now and then, forget expired ones.
        if rand::random::<u8>() < 8 {
            let _ = self.store.delete_expired_sessions(now).await;
        }
        Ok(NewSession {
            token,
            csrf,
            expires_at,
            user,
        })
    }

    /// The user of a live session cookie; `None` when unknown or expired.
    pub async fn session(&self, token: &str) -> Result<Option<ResolvedSession>, ControlError> {
        let Some(s) = self
            .store
            .session_by_hash(&digest(token), Utc::now())
            .await?
        else {
            return Ok(None);
        };
        let Some(user) = self.store.get_user(s.user_id).await? else {
            return Ok(None);
        };
        if user.disabled_at.is_some() {
            return Ok(None);
        }
        Ok(Some(ResolvedSession {
            user: self.signed_in(user).await?,
            csrf_hash: s.csrf_hash,
        }))
    }

    pub async fn end_session(&self, token: &str) -> Result<(), ControlError> {
        Ok(self.store.delete_session(&digest(token)).await?)
    }

    // ---- personal access tokens ----

    pub async fn create_token(
        &self,
        user: UserId,
        name: &str,
        expires_in_days: Option<u32>,
    ) -> Result<NewAccessToken, ControlError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(ControlError::invalid(
                "name",
                "must have 1 to 100 characters",
            ));
        }
        if let Some(d) = expires_in_days {
            if !(1..=3650).contains(&d) {
                return Err(ControlError::invalid(
                    "expires_in_days",
                    "must be between 1 and 3650 (or absent: never)",
                ));
            }
        }
        let token = generate(ACCESS_TOKEN_PREFIX);
        let now = Utc::now();
        let record = AccessTokenRecord {
            id: AccessTokenId::new(),
            user_id: user,
            name: name.to_string(),
            token_hash: digest(&token),
            created_at: now,
            expires_at: expires_in_days.map(|d| now + Duration::days(i64::from(d))),
            last_used_at: None,
            revoked_at: None,
        };
        self.store.insert_access_token(&record).await?;
        Ok(NewAccessToken { token, record })
    }

    pub async fn tokens_of(&self, user: UserId) -> Result<Vec<AccessTokenRecord>, ControlError> {
        Ok(self.store.access_tokens_of(user).await?)
    }

    pub async fn revoke_token(&self, user: UserId, id: AccessTokenId) -> Result<(), ControlError> {
        if self.store.revoke_access_token(user, id, Utc::now()).await? {
            Ok(())
        } else {
            Err(ControlError::not_found("access token", id))
        }
    }

    /// The user of a live personal access token; `None` when unknown,
    /// revoked or expired.
    pub async fn token_user(&self, token: &str) -> Result<Option<SignedInUser>, ControlError> {
        let now = Utc::now();
        let Some(t) = self.store.access_token_by_hash(&digest(token)).await? else {
            return Ok(None);
        };
        if t.revoked_at.is_some() || t.expires_at.is_some_and(|e| e <= now) {
            return Ok(None);
        }
        let Some(user) = self.store.get_user(t.user_id).await? else {
            return Ok(None);
        };
        if user.disabled_at.is_some() {
            return Ok(None);
        }
        // At most one write a minute per token.
        if t.last_used_at
            .is_none_or(|l| now - l > Duration::minutes(1))
        {
            let _ = self.store.touch_access_token(t.id, now).await;
        }
        Ok(Some(self.signed_in(user).await?))
    }

    // ---- audit ----

    /// Append to the audit log. A failure is logged, never the caller's.
    pub async fn audit(&self, entry: NewAuditEntry) {
        if let Err(e) = self.store.append_audit(&entry).await {
            tracing::error!(error = %e, action = %entry.action, "cannot write the audit log");
        }
    }

    pub async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, ControlError> {
        Ok(self.store.list_audit(filter).await?)
    }

    /// The user an email names, for a refused sign-in's audit entry (so
    /// that the user reads the attempts on their account); `None` when
    /// nobody has it or the store cannot say.
    pub async fn user_id_by_email(&self, email: &str) -> Option<UserId> {
        match self.store.user_by_email(email.trim()).await {
            Ok(u) => u.map(|u| u.id),
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up a refused sign-in's user");
                None
            }
        }
    }
}

/// A valid argon2id hash of a random string: verified against when the
/// user is unknown, so the answer takes as long as for a known one.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3Wl7gKj0xHf8fq5Z2oB3Hn0h2m9Zc1a4pC8r6s0t1uE";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"));
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(hasher()
            .verify_password(b"correct horse battery", &parsed)
            .is_ok());
        assert!(hasher().verify_password(b"wrong", &parsed).is_err());
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[tokio::test]
    async fn sealed_cookies_detect_changes() {
        let db = gpufleet_test_support::db::TestDb::fresh().await;
        let store = Store::connect(db.url()).await.unwrap();
        let a = Accounts::new(store.clone(), std::time::Duration::from_secs(60), "k1");
        let sealed = a.seal(b"state=1");
        assert_eq!(a.unseal(&sealed).unwrap(), b"state=1");
        let mut changed = sealed.clone();
        changed.insert(0, 'x');
        assert!(a.unseal(&changed).is_none());
        let other = Accounts::new(store, std::time::Duration::from_secs(60), "k2");
        assert!(other.unseal(&sealed).is_none());
    }

    #[test]
    fn rules_name_the_field() {
        let field = |e: ControlError| match e {
            ControlError::InvalidInput { field, .. } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(check_password_rules("short").unwrap_err()),
            "password"
        );
        assert_eq!(field(check_email("no-at-sign").unwrap_err()), "email");
        assert_eq!(field(check_email("a@b").unwrap_err()), "email");
        assert_eq!(check_email(" Ann@Example.COM ").unwrap(), "ann@example.com");
    }
}
