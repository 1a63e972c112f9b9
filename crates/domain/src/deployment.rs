//! Deployments: a model's serving declared once (placements, replica
//! bounds, autoscaling), which the control plane keeps true. Pure: the
//! spec, its validation, its duration strings and the states.

use crate::ids::IdParseError;
use crate::names::ProviderName;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

/// gpufleet's id of a deployment: `d-` followed by a UUIDv7 in simple form
/// (as [`crate::InstanceId`] with `i-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeploymentId(Uuid);

impl DeploymentId {
    pub const PREFIX: &'static str = "d-";
    /// What [`FromStr`] accepts, as a regular expression.
    pub const PATTERN: &'static str = "^d-[0-9a-f]{32}$";

    /// A new, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl Default for DeploymentId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for DeploymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.0.simple())
    }
}

impl FromStr for DeploymentId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IdParseError {
            kind: "deployment",
            value: s.to_string(),
            expected: "\"d-\" followed by 32 lowercase hex digits",
        };
        let rest = s.strip_prefix(Self::PREFIX).ok_or_else(err)?;
        if rest.len() != 32 || !rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err());
        }
        Uuid::parse_str(rest).map(Self).map_err(|_| err())
    }
}

impl Serialize for DeploymentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeploymentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for DeploymentId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(Self::PATTERN))
            .examples([serde_json::Value::from(
                "d-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b",
            )])
            .into()
    }
}
impl utoipa::ToSchema for DeploymentId {}

/// A duration written as a whole number and a unit: `30s`, `5m`, `1h`
/// (also `d`). Serialised in the largest unit that divides it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

/// A duration string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {value:?}: expected a whole number and a unit (s, m, h or d), e.g. \"30s\", \"5m\", \"1h\"")]
pub struct DurationError {
    pub value: String,
}

impl HumanDuration {
    pub fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
    pub fn as_secs(&self) -> u64 {
        self.0.as_secs()
    }
}

impl FromStr for HumanDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError {
            value: s.to_string(),
        };
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(err());
        }
        let n: u64 = num.parse().map_err(|_| err())?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(err()),
        };
        n.checked_mul(mult).map(Self::from_secs).ok_or_else(err)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.as_secs();
        if s != 0 && s.is_multiple_of(86_400) {
            write!(f, "{}d", s / 86_400)
        } else if s != 0 && s.is_multiple_of(3_600) {
            write!(f, "{}h", s / 3_600)
        } else if s != 0 && s.is_multiple_of(60) {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for HumanDuration {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9]+[smhd]$"))
            .examples([serde_json::Value::from("5m")])
            .into()
    }
}
impl utoipa::ToSchema for HumanDuration {}

/// Where replicas may run: one provider, zone and machine type. A
/// deployment's placements are an ordered fallback list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub provider: ProviderName,
    #[schema(example = "fr-par-2")]
    pub zone: String,
    #[schema(example = "L4-1-24G")]
    pub instance_type: String,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.provider, self.zone, self.instance_type)
    }
}

/// Bounds on the number of replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaBounds {
    pub min: u32,
    pub max: u32,
}

/// The figure autoscaling follows, per ready replica.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ScalingMetric {
    /// Requests in flight through the router.
    #[default]
    RequestsInFlight,
    /// Requests waiting in the engine's queue (heartbeats).
    QueueLength,
    /// KV-cache use, 0..1 (heartbeats).
    KvCacheUsage,
    /// Tokens generated per second (heartbeats).
    TokensPerSecond,
}

impl ScalingMetric {
    pub const ALL: [ScalingMetric; 4] = [
        Self::RequestsInFlight,
        Self::QueueLength,
        Self::KvCacheUsage,
        Self::TokensPerSecond,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequestsInFlight => "requests_in_flight",
            Self::QueueLength => "queue_length",
            Self::KvCacheUsage => "kv_cache_usage",
            Self::TokensPerSecond => "tokens_per_second",
        }
    }
}

impl fmt::Display for ScalingMetric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_target() -> f64 {
    16.0
}
fn default_scale_down_delay() -> HumanDuration {
    HumanDuration::from_secs(300)
}

/// How the number of replicas follows load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Autoscaling {
    #[serde(default)]
    pub metric: ScalingMetric,
    /// The figure one replica should carry; above it on average, scale up.
    #[serde(default = "default_target")]
    pub target_per_replica: f64,
    /// How long a lower desire must hold before replicas are removed.
    #[serde(default = "default_scale_down_delay")]
    pub scale_down_delay: HumanDuration,
}

impl Default for Autoscaling {
    fn default() -> Self {
        Self {
            metric: ScalingMetric::default(),
            target_per_replica: default_target(),
            scale_down_delay: default_scale_down_delay(),
        }
    }
}

impl Autoscaling {
    /// Replicas wanted for `total` of the metric over all ready replicas
    /// (at least 1 while there is any load).
    pub fn replicas_for(&self, total: f64) -> u32 {
        // NaN counts as no load / no target.
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(total) || !positive(self.target_per_replica) {
            return 0;
        }
        let n = (total / self.target_per_replica).ceil();
        if n >= f64::from(u32::MAX) {
            u32::MAX
        } else {
            n as u32
        }
    }
}

/// What a deployment declares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Ordered: replicas go to the first placement with capacity.
    pub placements: Vec<Placement>,
    pub replicas: ReplicaBounds,
    #[serde(default)]
    pub autoscaling: Autoscaling,
    /// Not acted upon yet (scale to zero is a later phase); validated and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after: Option<HumanDuration>,
    /// Extra engine arguments (kept with the spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_args: Option<Vec<String>>,
}

/// A spec that cannot be served: the field's path (e.g. `replicas.min`,
/// `placements[1].zone`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Most placements a deployment may list.
pub const MAX_PLACEMENTS: usize = 16;
/// Most replicas a deployment may ask for.
pub const MAX_REPLICAS: u32 = 256;

impl DeploymentSpec {
    /// The rules that need no catalog: bounds, target, placements present.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.placements.is_empty() {
            return Err(SpecError::new(
                "placements",
                "at least one placement is needed",
            ));
        }
        if self.placements.len() > MAX_PLACEMENTS {
            return Err(SpecError::new(
                "placements",
                format!("at most {MAX_PLACEMENTS} placements"),
            ));
        }
        for (i, p) in self.placements.iter().enumerate() {
            if p.zone.trim().is_empty() {
                return Err(SpecError::new(
                    format!("placements[{i}].zone"),
                    "must not be empty",
                ));
            }
            if p.instance_type.trim().is_empty() {
                return Err(SpecError::new(
                    format!("placements[{i}].instance_type"),
                    "must not be empty",
                ));
            }
            if self.placements[..i].contains(p) {
                return Err(SpecError::new(
                    format!("placements[{i}]"),
                    format!("{p} is listed twice"),
                ));
            }
        }
        let r = self.replicas;
        if r.min > r.max {
            return Err(SpecError::new(
                "replicas.min",
                format!("min ({}) is above max ({})", r.min, r.max),
            ));
        }
        if r.max > MAX_REPLICAS {
            return Err(SpecError::new(
                "replicas.max",
                format!("at most {MAX_REPLICAS}"),
            ));
        }
        if r.max == 0 {
            return Err(SpecError::new("replicas.max", "must be at least 1"));
        }
        if r.min == 0 && self.scale_to_zero_after.is_none() {
            return Err(SpecError::new(
                "replicas.min",
                "must be at least 1 unless scale_to_zero_after is set",
            ));
        }
        let a = self.autoscaling;
        if !a.target_per_replica.is_finite() || a.target_per_replica <= 0.0 {
            return Err(SpecError::new(
                "autoscaling.target_per_replica",
                "must be a number above 0",
            ));
        }
        if a.metric == ScalingMetric::KvCacheUsage && a.target_per_replica > 1.0 {
            return Err(SpecError::new(
                "autoscaling.target_per_replica",
                "KV-cache use is a fraction: the target must be at most 1",
            ));
        }
        if let Some(args) = &self.engine_args {
            if let Some(i) = args.iter().position(|a| a.contains('\0')) {
                return Err(SpecError::new(
                    format!("engine_args[{i}]"),
                    "must not contain NUL",
                ));
            }
        }
        Ok(())
    }

    /// `wanted` within the bounds.
    pub fn clamp(&self, wanted: u32) -> u32 {
        wanted.clamp(self.replicas.min, self.replicas.max)
    }
}

/// What the keeper last saw of a deployment's replicas, with conditions a
/// person can read ("2 of 3 ready; 1 starting in fr-par-2").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaStatus {
    /// Serving (routable).
    pub ready: u32,
    /// On their way: provisioning, booting or starting.
    pub starting: u32,
    /// Live but failing their health checks.
    pub unhealthy: u32,
    /// Finishing their requests before termination.
    pub draining: u32,
    /// One line: the state of the whole.
    pub summary: String,
    /// Details, one line each (waiting for capacity, replacing, ...).
    #[serde(default)]
    pub conditions: Vec<String>,
}

/// Where a deployment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Kept: replicas are created, replaced and scaled.
    Active,
    /// Delete asked: its instances drain and terminate.
    Deleting,
    /// None of its instances is live any more.
    Deleted,
}

impl DeploymentState {
    pub const ALL: [DeploymentState; 3] = [Self::Active, Self::Deleting, Self::Deleted];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
        }
    }
}

impl fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`DeploymentState`] or [`DeploymentAction`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownDeploymentName {
    pub what: &'static str,
    pub value: String,
}

impl FromStr for DeploymentState {
    type Err = UnknownDeploymentName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownDeploymentName {
                what: "deployment state",
                value: s.to_string(),
            })
    }
}

/// What a deployment's timeline entry records: each decision the keeper
/// makes, and the user's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentAction {
    Created,
    Updated,
    DeleteRequested,
    Deleted,
    /// A replica created to reach the desired count.
    ScaleUp,
    /// A replica removed above the desired count.
    ScaleDown,
    /// A replacement for a failed or long-unhealthy replica.
    Replace,
    /// A placement out of capacity or quota: the next one is tried.
    Fallback,
    /// The desired count changed (autoscaling or bounds).
    DesiredChanged,
    /// Something the keeper could not do (e.g. no placement with capacity).
    Blocked,
    /// The router holds requests: no ready replica (scaled to zero, starting).
    Hold,
    /// The router releases the held requests: a replica is ready.
    Release,
}

impl DeploymentAction {
    pub const ALL: [DeploymentAction; 12] = [
        Self::Created,
        Self::Updated,
        Self::DeleteRequested,
        Self::Deleted,
        Self::ScaleUp,
        Self::ScaleDown,
        Self::Replace,
        Self::Fallback,
        Self::DesiredChanged,
        Self::Blocked,
        Self::Hold,
        Self::Release,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::DeleteRequested => "delete_requested",
            Self::Deleted => "deleted",
            Self::ScaleUp => "scale_up",
            Self::ScaleDown => "scale_down",
            Self::Replace => "replace",
            Self::Fallback => "fallback",
            Self::DesiredChanged => "desired_changed",
            Self::Blocked => "blocked",
            Self::Hold => "hold",
            Self::Release => "release",
        }
    }
}

impl fmt::Display for DeploymentAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeploymentAction {
    type Err = UnknownDeploymentName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownDeploymentName {
                what: "deployment action",
                value: s.to_string(),
            })
    }
}

/// A name people give a deployment: 1–63 characters of lowercase letters,
/// digits and `-`, starting with a letter or digit.
pub fn validate_deployment_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            "name",
            "must be 1 to 63 characters of lowercase letters, digits and '-', not starting with '-'",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeploymentSpec {
        serde_json::from_value(serde_json::json!({
            "placements": [
                {"provider": "scaleway", "zone": "fr-par-2", "instance_type": "L4-1-24G"},
                {"provider": "scaleway", "zone": "nl-ams-1", "instance_type": "L4-1-24G"}
            ],
            "replicas": {"min": 1, "max": 8},
            "autoscaling": {"metric": "requests_in_flight", "target_per_replica": 16, "scale_down_delay": "5m"},
            "scale_to_zero_after": "15m"
        }))
        .unwrap()
    }

    #[test]
    fn deployment_id_round_trips_and_rejects_garbage() {
        let id = DeploymentId::new();
        let s = id.to_string();
        assert!(s.starts_with("d-") && s.len() == 34);
        assert_eq!(s.parse::<DeploymentId>().unwrap(), id);
        for bad in [
            "",
            "d-",
            "i-0192f5a0c3b47d1e9a4b5c6d7e8f9a0b",
            "d-0192F5A0C3B47D1E9A4B5C6D7E8F9A0B",
        ] {
            assert!(bad.parse::<DeploymentId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_parse_and_print() {
        for (s, secs, back) in [
            ("30s", 30, "30s"),
            ("5m", 300, "5m"),
            ("1h", 3600, "1h"),
            ("90s", 90, "90s"),
            ("120s", 120, "2m"),
            ("2d", 172_800, "2d"),
            ("0s", 0, "0s"),
        ] {
            let d: HumanDuration = s.parse().unwrap();
            assert_eq!(d.as_secs(), secs, "{s}");
            assert_eq!(d.to_string(), back);
        }
        for bad in [
            "",
            "5",
            "m",
            "5min",
            "-1s",
            "1.5h",
            "5 m",
            "99999999999999999999d",
        ] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_from_the_issue_is_valid_and_round_trips() {
        let s = spec();
        s.validate().unwrap();
        assert_eq!(s.autoscaling.scale_down_delay.as_secs(), 300);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["autoscaling"]["scale_down_delay"], "5m");
        assert_eq!(serde_json::from_value::<DeploymentSpec>(json).unwrap(), s);
    }

    #[test]
    fn validation_names_the_field() {
        type Mutation = Box<dyn Fn(&mut DeploymentSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|s| s.replicas = ReplicaBounds { min: 3, max: 2 }),
                "replicas.min",
            ),
            (
                Box::new(|s| s.replicas = ReplicaBounds { min: 0, max: 0 }),
                "replicas.max",
            ),
            (
                Box::new(|s| {
                    s.scale_to_zero_after = None;
                    s.replicas.min = 0;
                }),
                "replicas.min",
            ),
            (Box::new(|s| s.placements.clear()), "placements"),
            (
                Box::new(|s| s.autoscaling.target_per_replica = 0.0),
                "autoscaling.target_per_replica",
            ),
            (
                Box::new(|s| s.autoscaling.target_per_replica = f64::NAN),
                "autoscaling.target_per_replica",
            ),
            (
                Box::new(|s| s.placements[1].zone = " ".into()),
                "placements[1].zone",
            ),
            (
                Box::new(|s| {
                    let p = s.placements[0].clone();
                    s.placements[1] = p;
                }),
                "placements[1]",
            ),
        ];
        for (mutate, field) in cases {
            let mut s = spec();
            mutate(&mut s);
            assert_eq!(s.validate().unwrap_err().field, field);
        }
        // min 0 is fine with scale to zero.
        let mut s = spec();
        s.replicas.min = 0;
        s.validate().unwrap();
    }

    #[test]
    fn autoscaling_asks_ceil_of_load_over_target() {
        let a = Autoscaling {
            target_per_replica: 16.0,
            ..Autoscaling::default()
        };
        assert_eq!(a.replicas_for(0.0), 0);
        assert_eq!(a.replicas_for(1.0), 1);
        assert_eq!(a.replicas_for(16.0), 1);
        assert_eq!(a.replicas_for(17.0), 2);
        assert_eq!(a.replicas_for(64.0), 4);
        assert_eq!(spec().clamp(0), 1);
        assert_eq!(spec().clamp(20), 8);
    }

    #[test]
    fn names_and_states() {
        validate_deployment_name("qwen-7b").unwrap();
        for bad in ["", "-x", "Qwen", "a_b", &"x".repeat(64)] {
            assert_eq!(validate_deployment_name(bad).unwrap_err().field, "name");
        }
        for s in DeploymentState::ALL {
            assert_eq!(s.as_str().parse::<DeploymentState>().unwrap(), s);
        }
        for a in DeploymentAction::ALL {
            assert_eq!(a.as_str().parse::<DeploymentAction>().unwrap(), a);
        }
    }
}
