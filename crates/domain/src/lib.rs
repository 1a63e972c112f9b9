//! gpufleet's domain: the vocabulary every other crate speaks.
//!
//! Pure: no I/O, no clocks, no async. Typed identifiers ([`ids`]), the instance
//! life cycle as a pure state machine ([`lifecycle`]), failure reasons and
//! validated names ([`names`]), and catalog types ([`catalog`]).

pub mod catalog;
pub mod deployment;
pub mod ids;
pub mod lifecycle;
pub mod metrics;
pub mod names;
pub mod spend;
pub mod teams;

pub use catalog::{GpuSpec, InstanceType, Zone};
pub use deployment::{
    Autoscaling, DeploymentAction, DeploymentId, DeploymentSpec, DeploymentState, HumanDuration,
    Placement, ReplicaBounds, ReplicaStatus, ScalingMetric, SpecError,
};
pub use ids::{IdParseError, InstanceId, ProviderInstanceId};
pub use lifecycle::{
    progress, transition, FailureReason, InstanceStatus, InvalidTransition, LifecycleEvent,
    Milestones,
};
pub use names::{ModelName, NameError, ProviderName};
pub use teams::{
    AccessTokenId, ActorKind, AuditOutcome, KeyLimits, LimitError, Permission, ProjectId, Role,
    RoleError, UserId,
};
