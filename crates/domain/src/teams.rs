//! Teams: projects, users, roles and what each role may do.
//!
//! A **project** owns instances, deployments, API keys and their usage. A
//! **user** holds a [`Role`] in some projects; what a role allows is
//! [`Role::allows`], the one table every route consults. The admin token
//! (bootstrap and break-glass) stands above all of it.

use crate::ids::IdParseError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A project's id, which is also its name: a lower-case slug
/// ([`ProjectId::PATTERN`]), e.g. `default`, `research`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectId(String);

impl ProjectId {
    /// What [`FromStr`] accepts.
    pub const PATTERN: &'static str = "^[a-z0-9][a-z0-9-]{0,38}$";
    /// The project everything created before projects existed belongs to.
    pub const DEFAULT: &'static str = "default";

    pub fn default_project() -> Self {
        Self(Self::DEFAULT.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ProjectId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=39).contains(&s.len())
            && s.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-'));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(IdParseError {
                kind: "project",
                value: s.to_string(),
                expected: "1 to 39 lower-case letters, digits or dashes, not starting with a dash",
            })
        }
    }
}

impl Serialize for ProjectId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ProjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for ProjectId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(Self::PATTERN))
            .examples([serde_json::Value::from("research")])
            .into()
    }
}
impl utoipa::ToSchema for ProjectId {}

/// Ids made of a prefix and a UUIDv7 in simple form, so they sort by
/// creation time and only one spelling parses.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $pattern:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            /// What [`FromStr`] accepts, as a regular expression.
            pub const PATTERN: &'static str = $pattern;

            /// A new, time-ordered id.
            #[allow(clippy::new_without_default)]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", Self::PREFIX, self.0.simple())
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = || IdParseError {
                    kind: $kind,
                    value: s.to_string(),
                    expected: concat!("\"", $prefix, "\" followed by 32 lowercase hex digits"),
                };
                let rest = s.strip_prefix(Self::PREFIX).ok_or_else(err)?;
                if rest.len() != 32
                    || !rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                {
                    return Err(err());
                }
                Uuid::parse_str(rest).map(Self).map_err(|_| err())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some(Self::PATTERN))
                    .examples([serde_json::Value::from(concat!(
                        $prefix,
                        "0192f5a0c3b47d1e9a4b5c6d7e8f9a0b"
                    ))])
                    .into()
            }
        }
        impl utoipa::ToSchema for $name {}
    };
}

uuid_id!(
    /// A user's id: `us-` and a UUIDv7.
    UserId,
    "us-",
    "^us-[0-9a-f]{32}$",
    "user"
);
uuid_id!(
    /// A personal access token's id (not its secret): `pat-` and a UUIDv7.
    AccessTokenId,
    "pat-",
    "^pat-[0-9a-f]{32}$",
    "access token"
);

/// A user's role in one project.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything in the project.
    Viewer,
    /// A viewer who also creates and terminates instances, runs
    /// deployments and manages API keys.
    Operator,
    /// An operator who also grants and revokes roles.
    Admin,
}

/// What a request needs to be allowed in a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read the project's instances, deployments, keys, usage, spend, audit.
    Read,
    /// Create, terminate, archive instances; create, change, delete deployments.
    Operate,
    /// Create and revoke the project's API keys.
    ManageKeys,
    /// Grant and revoke roles in the project.
    ManageMembers,
}

impl Permission {
    pub const ALL: [Permission; 4] = [
        Permission::Read,
        Permission::Operate,
        Permission::ManageKeys,
        Permission::ManageMembers,
    ];
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The permission table.
    pub fn allows(self, p: Permission) -> bool {
        match (self, p) {
            (_, Permission::Read) => true,
            (Role::Viewer, _) => false,
            (Role::Operator, Permission::Operate | Permission::ManageKeys) => true,
            (Role::Operator, Permission::ManageMembers) => false,
            (Role::Admin, _) => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected admin, operator or viewer")]
pub struct RoleError(pub String);

impl FromStr for Role {
    type Err = RoleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| RoleError(s.to_string()))
    }
}

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    Success,
    /// Refused: not signed in, or not allowed.
    Denied,
    /// Allowed, but it failed (bad input, conflict, an error).
    Failure,
}

impl AuditOutcome {
    pub const ALL: [AuditOutcome; 3] = [
        AuditOutcome::Success,
        AuditOutcome::Denied,
        AuditOutcome::Failure,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Success => "success",
            AuditOutcome::Denied => "denied",
            AuditOutcome::Failure => "failure",
        }
    }

    /// From an HTTP status code.
    pub fn of_status(status: u16) -> Self {
        match status {
            200..=399 => AuditOutcome::Success,
            401 | 403 => AuditOutcome::Denied,
            _ => AuditOutcome::Failure,
        }
    }
}

impl FromStr for AuditOutcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown outcome {s:?}: expected success, denied or failure"))
    }
}

/// Who did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// The admin token.
    Admin,
    /// A signed-in user (session or personal access token).
    User,
    /// Nobody signed in (a failed sign-in).
    Anonymous,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Admin => "admin",
            ActorKind::User => "user",
            ActorKind::Anonymous => "anonymous",
        }
    }
}

impl FromStr for ActorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [ActorKind::Admin, ActorKind::User, ActorKind::Anonymous]
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown actor kind {s:?}"))
    }
}

/// What an API key may use: requests and tokens per minute, and a budget
/// per calendar month (UTC) in the currency of the instance prices.
/// `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyLimits {
    /// Requests in any 60 seconds.
    #[schema(minimum = 1, maximum = 10_000_000)]
    pub rpm: Option<u64>,
    /// Tokens (prompt and completion) in any 60 seconds.
    #[schema(minimum = 1, maximum = 10_000_000_000_u64)]
    pub tpm: Option<u64>,
    /// What the key may spend per calendar month.
    #[schema(minimum = 0)]
    pub monthly_budget: Option<f64>,
}

/// A limit out of range, naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct LimitError {
    pub field: &'static str,
    pub message: String,
}

impl KeyLimits {
    pub const MAX_RPM: u64 = 10_000_000;
    pub const MAX_TPM: u64 = 10_000_000_000;

    pub fn validate(&self) -> Result<(), LimitError> {
        if let Some(r) = self.rpm {
            if !(1..=Self::MAX_RPM).contains(&r) {
                return Err(LimitError {
                    field: "rpm",
                    message: format!(
                        "must be between 1 and {} (or null: no limit)",
                        Self::MAX_RPM
                    ),
                });
            }
        }
        if let Some(t) = self.tpm {
            if !(1..=Self::MAX_TPM).contains(&t) {
                return Err(LimitError {
                    field: "tpm",
                    message: format!(
                        "must be between 1 and {} (or null: no limit)",
                        Self::MAX_TPM
                    ),
                });
            }
        }
        if let Some(b) = self.monthly_budget {
            if !b.is_finite() || b < 0.0 {
                return Err(LimitError {
                    field: "monthly_budget",
                    message: "must be a number of at least 0 (or null: no budget)".into(),
                });
            }
        }
        Ok(())
    }

    pub fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.monthly_budget.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_permission_table() {
        use Permission::*;
        let table = [
            (Role::Viewer, [true, false, false, false]),
            (Role::Operator, [true, true, true, false]),
            (Role::Admin, [true, true, true, true]),
        ];
        for (role, row) in table {
            for (p, want) in [Read, Operate, ManageKeys, ManageMembers]
                .into_iter()
                .zip(row)
            {
                assert_eq!(role.allows(p), want, "{role} {p:?}");
            }
        }
    }

    #[test]
    fn project_ids_are_slugs() {
        for ok in ["default", "a", "research-2", "0x"] {
            assert_eq!(ok.parse::<ProjectId>().unwrap().as_str(), ok);
        }
        for bad in ["", "-a", "A", "a_b", "a b", &"x".repeat(40), "é"] {
            assert!(bad.parse::<ProjectId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roles_and_ids_parse_back() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("owner"
            .parse::<Role>()
            .unwrap_err()
            .to_string()
            .contains("admin, operator"));
        let u = UserId::new();
        assert_eq!(u.to_string().parse::<UserId>().unwrap(), u);
        assert!(u.to_string().starts_with("us-"));
        assert!("us-xyz".parse::<UserId>().is_err());
        let t = AccessTokenId::new();
        assert_eq!(t.to_string().parse::<AccessTokenId>().unwrap(), t);
        assert_eq!(AuditOutcome::of_status(201), AuditOutcome::Success);
        assert_eq!(AuditOutcome::of_status(404), AuditOutcome::Failure);
        assert_eq!(AuditOutcome::of_status(403), AuditOutcome::Denied);
    }

    #[test]
    fn limits_name_the_field() {
        let ok = KeyLimits {
            rpm: Some(60),
            tpm: Some(1000),
            monthly_budget: Some(0.0),
        };
        assert!(ok.validate().is_ok());
        let bad = |l: KeyLimits| l.validate().unwrap_err().field;
        assert_eq!(bad(KeyLimits { rpm: Some(0), ..ok }), "rpm");
        assert_eq!(
            bad(KeyLimits {
                tpm: Some(KeyLimits::MAX_TPM + 1),
                ..ok
            }),
            "tpm"
        );
        assert_eq!(
            bad(KeyLimits {
                monthly_budget: Some(-1.0),
                ..ok
            }),
            "monthly_budget"
        );
        assert_eq!(
            bad(KeyLimits {
                monthly_budget: Some(f64::NAN),
                ..ok
            }),
            "monthly_budget"
        );
        assert!(KeyLimits::default().is_unlimited());
    }
}
