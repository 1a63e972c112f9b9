//! Typed identifiers. An `InstanceId` can never be passed where a
//! `ProviderInstanceId` is expected.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Error returned when a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id {value:?}: expected {expected}")]
pub struct IdParseError {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// gpufleet's own id of an instance: `i-` followed by a UUIDv7 in simple
/// (lowercase hex, no dashes) form, so ids sort by creation time. Only that
/// canonical spelling parses ([`InstanceId::PATTERN`]), so one instance has
/// one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(Uuid);

impl InstanceId {
    pub const PREFIX: &'static str = "i-";
    /// What [`FromStr`] accepts, as a regular expression (the OpenAPI
    /// `pattern` of every instance id).
    pub const PATTERN: &'static str = "^i-[0-9a-f]{32}$";

    /// A new, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for InstanceId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.0.simple())
    }
}

impl FromStr for InstanceId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IdParseError {
            kind: "instance",
            value: s.to_string(),
            expected: "\"i-\" followed by 32 lowercase hex digits",
        };
        let rest = s.strip_prefix(Self::PREFIX).ok_or_else(err)?;
        if rest.len() != 32 || !rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err());
        }
        Uuid::parse_str(rest).map(Self).map_err(|_| err())
    }
}

impl Serialize for InstanceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InstanceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for InstanceId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(Self::PATTERN))
            .examples([serde_json::Value::from(
                "i-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b",
            )])
            .into()
    }
}
impl utoipa::ToSchema for InstanceId {}

/// The provider's own id of a machine (opaque; e.g. a Scaleway server UUID or
/// a Mock machine name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProviderInstanceId(String);

impl ProviderInstanceId {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProviderInstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_round_trips() {
        let id = InstanceId::new();
        let s = id.to_string();
        assert!(s.starts_with("i-"));
        assert_eq!(s.len(), 34);
        assert_eq!(s.parse::<InstanceId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<InstanceId>(&json).unwrap(), id);
    }

    #[test]
    fn instance_id_rejects_garbage() {
        for bad in [
            "",
            "i-",
            "x-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b",
            "i-zz",
            "0192f5a0c3b47d1e9a4b5c6d7e8f9a0b",
            "i-0192F5A0C3B47D1E9A4B5C6D7E8F9A0B",
            "i-0192f5a0-c3b4-7d1e-9a4b-5c6d7e8f9a0b",
            " i-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b",
        ] {
            assert!(bad.parse::<InstanceId>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn instance_ids_sort_by_creation() {
        let a = InstanceId::new();
        let b = InstanceId::new();
        assert!(a.to_string() < b.to_string() || a == b);
    }
}
