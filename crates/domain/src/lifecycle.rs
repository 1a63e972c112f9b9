//! The instance life cycle as a pure state machine.
//!
//! ```text
//! provisioning ─ProviderCreated→ booting ─IpAssigned→ starting ─EngineReady→ ready
//!                                                                ready ─HeartbeatsMissed→ unhealthy ─HealthRestored→ ready
//! any live state ─Fail(reason)→ failed ─AgentRecovered→ starting   (late heartbeat after startup_timeout)
//! ready ─TerminateRequested→ draining ─DrainComplete→ terminating ─ProviderConfirmedGone→ terminated ─Archive→ archived
//! other non-terminal ─TerminateRequested→ terminating
//! failed (cleaned up) ─Archive→ archived
//! ```
//!
//! Guards that need more than (status, event) — "late-heartbeat recovery only
//! for startup_timeout before cleanup began", "archive a failed instance only
//! once it is cleaned up" — live with the caller, which owns that data.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where an instance is in its life. Serialised in lowercase.
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
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Recorded; the provider create call is pending or in flight (the intent is persisted).
    Provisioning,
    /// The provider created the machine; waiting for it to boot and get an IP.
    Booting,
    /// The machine has an IP; the agent is registering and the engine loading the model.
    Starting,
    /// The engine serves the model and heartbeats are fresh: routable.
    Ready,
    /// Was ready, but heartbeats stopped or probes fail; may come back.
    Unhealthy,
    /// Termination asked for; finishing in-flight requests, no new ones.
    Draining,
    /// The provider is being asked to delete the machine, until it confirms.
    Terminating,
    /// The provider confirmed the machine is gone. Nothing is billed.
    Terminated,
    /// Something went wrong (see `status_reason`); the machine is cleaned up after a grace period.
    Failed,
    /// Hidden from default listings; kept for history.
    Archived,
}

impl InstanceStatus {
    pub const ALL: [InstanceStatus; 10] = [
        Self::Provisioning,
        Self::Booting,
        Self::Starting,
        Self::Ready,
        Self::Unhealthy,
        Self::Draining,
        Self::Terminating,
        Self::Terminated,
        Self::Failed,
        Self::Archived,
    ];
    /// States in which the instance will never change again on its own.
    pub const TERMINAL: [InstanceStatus; 2] = [Self::Terminated, Self::Archived];
    /// States that receive inference traffic.
    pub const ROUTABLE: [InstanceStatus; 1] = [Self::Ready];
    /// States on the way up, each with a startup deadline.
    pub const STARTING_UP: [InstanceStatus; 3] =
        [Self::Provisioning, Self::Booting, Self::Starting];
    /// States in which a provider machine may exist and cost money
    /// (`failed` until its cleanup completes).
    pub const BILLABLE: [InstanceStatus; 8] = [
        Self::Provisioning,
        Self::Booting,
        Self::Starting,
        Self::Ready,
        Self::Unhealthy,
        Self::Draining,
        Self::Terminating,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Booting => "booting",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Unhealthy => "unhealthy",
            Self::Draining => "draining",
            Self::Terminating => "terminating",
            Self::Terminated => "terminated",
            Self::Failed => "failed",
            Self::Archived => "archived",
        }
    }

    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }
    pub fn is_routable(self) -> bool {
        Self::ROUTABLE.contains(&self)
    }
    pub fn is_starting_up(self) -> bool {
        Self::STARTING_UP.contains(&self)
    }
    pub fn is_billable(self) -> bool {
        Self::BILLABLE.contains(&self)
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not an instance status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}: expected one of provisioning, booting, starting, ready, unhealthy, draining, terminating, terminated, failed, archived")]
pub struct UnknownStatus(pub String);

impl FromStr for InstanceStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// Why an instance failed. Serialised in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The provider refused to create the machine (permanent error, or retries exhausted).
    ProvisionFailed,
    /// The provider has no capacity for this type in this zone.
    OutOfCapacity,
    /// The instance did not become ready before its startup deadline.
    StartupTimeout,
    /// Readiness probes kept failing.
    HealthCheckFailed,
    /// The provider says the machine no longer exists though we did not delete it.
    ProviderDeleted,
    /// The agent stopped heartbeating for longer than the lost-after period.
    AgentLost,
    /// The engine could not be started or kept crashing.
    EngineFailed,
}

impl FailureReason {
    pub const ALL: [FailureReason; 7] = [
        Self::ProvisionFailed,
        Self::OutOfCapacity,
        Self::StartupTimeout,
        Self::HealthCheckFailed,
        Self::ProviderDeleted,
        Self::AgentLost,
        Self::EngineFailed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProvisionFailed => "provision_failed",
            Self::OutOfCapacity => "out_of_capacity",
            Self::StartupTimeout => "startup_timeout",
            Self::HealthCheckFailed => "health_check_failed",
            Self::ProviderDeleted => "provider_deleted",
            Self::AgentLost => "agent_lost",
            Self::EngineFailed => "engine_failed",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown failure reason {s:?}"))
    }
}

/// Something that happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event", content = "reason")]
pub enum LifecycleEvent {
    /// The provider accepted the create call and returned a machine id.
    ProviderCreated,
    /// The machine has an address.
    IpAssigned,
    /// The agent reports the engine serving the model and the readiness probe passed.
    EngineReady,
    /// Heartbeats went stale, or the readiness probe failed.
    HeartbeatsMissed,
    /// Heartbeats and probes are good again.
    HealthRestored,
    /// The agent of an instance failed for startup_timeout showed up before cleanup began.
    AgentRecovered,
    /// A user or the system asked for termination.
    TerminateRequested,
    /// No requests are in flight any more (or the drain deadline passed).
    DrainComplete,
    /// The provider confirmed the machine no longer exists.
    ProviderConfirmedGone,
    /// Something went wrong.
    Fail(FailureReason),
    /// Hide from default listings.
    Archive,
}

impl LifecycleEvent {
    /// Every event, with one representative failure reason, for table tests.
    pub const ALL: [LifecycleEvent; 11] = [
        Self::ProviderCreated,
        Self::IpAssigned,
        Self::EngineReady,
        Self::HeartbeatsMissed,
        Self::HealthRestored,
        Self::AgentRecovered,
        Self::TerminateRequested,
        Self::DrainComplete,
        Self::ProviderConfirmedGone,
        Self::Fail(FailureReason::StartupTimeout),
        Self::Archive,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::ProviderCreated => "provider_created",
            Self::IpAssigned => "ip_assigned",
            Self::EngineReady => "engine_ready",
            Self::HeartbeatsMissed => "heartbeats_missed",
            Self::HealthRestored => "health_restored",
            Self::AgentRecovered => "agent_recovered",
            Self::TerminateRequested => "terminate_requested",
            Self::DrainComplete => "drain_complete",
            Self::ProviderConfirmedGone => "provider_confirmed_gone",
            Self::Fail(_) => "fail",
            Self::Archive => "archive",
        }
    }
}

/// An event that does not apply in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("event {} is not allowed in state {from}", event.name())]
pub struct InvalidTransition {
    pub from: InstanceStatus,
    pub event: LifecycleEvent,
}

/// The life cycle: the next status after `event` in `from`, or why not.
pub fn transition(
    from: InstanceStatus,
    event: LifecycleEvent,
) -> Result<InstanceStatus, InvalidTransition> {
    use InstanceStatus as S;
    use LifecycleEvent as E;
    let next = match (from, event) {
        (S::Provisioning, E::ProviderCreated) => S::Booting,
        (S::Booting, E::IpAssigned) => S::Starting,
        (S::Starting, E::EngineReady) => S::Ready,
        (S::Unhealthy, E::EngineReady | E::HealthRestored) => S::Ready,
        (S::Ready, E::HeartbeatsMissed) => S::Unhealthy,
        (S::Failed, E::AgentRecovered) => S::Starting,
        (S::Ready, E::TerminateRequested) => S::Draining,
        (
            S::Provisioning | S::Booting | S::Starting | S::Unhealthy | S::Failed,
            E::TerminateRequested,
        ) => S::Terminating,
        (S::Draining, E::DrainComplete) => S::Terminating,
        (S::Terminating, E::ProviderConfirmedGone) => S::Terminated,
        (
            S::Provisioning | S::Booting | S::Starting | S::Ready | S::Unhealthy | S::Draining,
            E::Fail(_),
        ) => S::Failed,
        (S::Terminated | S::Failed, E::Archive) => S::Archived,
        _ => return Err(InvalidTransition { from, event }),
    };
    Ok(next)
}

/// Steps completed on the way to ready, used for the progress percentage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Milestones {
    pub provider_created: bool,
    pub ip_assigned: bool,
    pub agent_registered: bool,
    pub engine_started: bool,
}

/// Progress in percent of the instance's current journey: towards `ready`
/// while starting up, towards `terminated` while tearing down.
///
/// Start-up: intent recorded 5, provider created 25, booting 30, IP 40,
/// starting 50, agent registered 60, engine started 75, ready 100.
/// Teardown: draining 25, terminating 50, terminated/archived 100.
/// Unhealthy keeps 100 (it was ready). Failed keeps what was reached.
pub fn progress(status: InstanceStatus, m: Milestones) -> u8 {
    use InstanceStatus as S;
    let startup = || {
        let mut p = 5;
        if m.provider_created {
            p = 25;
        }
        if status != S::Provisioning && m.provider_created {
            p = 30;
        }
        if m.ip_assigned {
            p = 40;
        }
        if status == S::Starting {
            p = p.max(50);
        }
        if m.agent_registered {
            p = p.max(60);
        }
        if m.engine_started {
            p = p.max(75);
        }
        p
    };
    match status {
        S::Provisioning | S::Booting | S::Starting | S::Failed => startup(),
        S::Ready | S::Unhealthy => 100,
        S::Draining => 25,
        S::Terminating => 50,
        S::Terminated | S::Archived => 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceStatus as S;
    use LifecycleEvent as E;

    /// Every (status, event) pair, with its expected outcome. Adding a status
    /// or an event breaks this test until the table is reviewed.
    #[test]
    fn transition_table_covers_every_pair() {
        let f = E::Fail(FailureReason::StartupTimeout);
        let table: &[(S, E, Option<S>)] = &[
            (S::Provisioning, E::ProviderCreated, Some(S::Booting)),
            (S::Provisioning, E::IpAssigned, None),
            (S::Provisioning, E::EngineReady, None),
            (S::Provisioning, E::HeartbeatsMissed, None),
            (S::Provisioning, E::HealthRestored, None),
            (S::Provisioning, E::AgentRecovered, None),
            (S::Provisioning, E::TerminateRequested, Some(S::Terminating)),
            (S::Provisioning, E::DrainComplete, None),
            (S::Provisioning, E::ProviderConfirmedGone, None),
            (S::Provisioning, f, Some(S::Failed)),
            (S::Provisioning, E::Archive, None),
            (S::Booting, E::ProviderCreated, None),
            (S::Booting, E::IpAssigned, Some(S::Starting)),
            (S::Booting, E::EngineReady, None),
            (S::Booting, E::HeartbeatsMissed, None),
            (S::Booting, E::HealthRestored, None),
            (S::Booting, E::AgentRecovered, None),
            (S::Booting, E::TerminateRequested, Some(S::Terminating)),
            (S::Booting, E::DrainComplete, None),
            (S::Booting, E::ProviderConfirmedGone, None),
            (S::Booting, f, Some(S::Failed)),
            (S::Booting, E::Archive, None),
            (S::Starting, E::ProviderCreated, None),
            (S::Starting, E::IpAssigned, None),
            (S::Starting, E::EngineReady, Some(S::Ready)),
            (S::Starting, E::HeartbeatsMissed, None),
            (S::Starting, E::HealthRestored, None),
            (S::Starting, E::AgentRecovered, None),
            (S::Starting, E::TerminateRequested, Some(S::Terminating)),
            (S::Starting, E::DrainComplete, None),
            (S::Starting, E::ProviderConfirmedGone, None),
            (S::Starting, f, Some(S::Failed)),
            (S::Starting, E::Archive, None),
            (S::Ready, E::ProviderCreated, None),
            (S::Ready, E::IpAssigned, None),
            (S::Ready, E::EngineReady, None),
            (S::Ready, E::HeartbeatsMissed, Some(S::Unhealthy)),
            (S::Ready, E::HealthRestored, None),
            (S::Ready, E::AgentRecovered, None),
            (S::Ready, E::TerminateRequested, Some(S::Draining)),
            (S::Ready, E::DrainComplete, None),
            (S::Ready, E::ProviderConfirmedGone, None),
            (S::Ready, f, Some(S::Failed)),
            (S::Ready, E::Archive, None),
            (S::Unhealthy, E::ProviderCreated, None),
            (S::Unhealthy, E::IpAssigned, None),
            (S::Unhealthy, E::EngineReady, Some(S::Ready)),
            (S::Unhealthy, E::HeartbeatsMissed, None),
            (S::Unhealthy, E::HealthRestored, Some(S::Ready)),
            (S::Unhealthy, E::AgentRecovered, None),
            (S::Unhealthy, E::TerminateRequested, Some(S::Terminating)),
            (S::Unhealthy, E::DrainComplete, None),
            (S::Unhealthy, E::ProviderConfirmedGone, None),
            (S::Unhealthy, f, Some(S::Failed)),
            (S::Unhealthy, E::Archive, None),
            (S::Draining, E::ProviderCreated, None),
            (S::Draining, E::IpAssigned, None),
            (S::Draining, E::EngineReady, None),
            (S::Draining, E::HeartbeatsMissed, None),
            (S::Draining, E::HealthRestored, None),
            (S::Draining, E::AgentRecovered, None),
            (S::Draining, E::TerminateRequested, None),
            (S::Draining, E::DrainComplete, Some(S::Terminating)),
            (S::Draining, E::ProviderConfirmedGone, None),
            (S::Draining, f, Some(S::Failed)),
            (S::Draining, E::Archive, None),
            (S::Terminating, E::ProviderCreated, None),
            (S::Terminating, E::IpAssigned, None),
            (S::Terminating, E::EngineReady, None),
            (S::Terminating, E::HeartbeatsMissed, None),
            (S::Terminating, E::HealthRestored, None),
            (S::Terminating, E::AgentRecovered, None),
            (S::Terminating, E::TerminateRequested, None),
            (S::Terminating, E::DrainComplete, None),
            (
                S::Terminating,
                E::ProviderConfirmedGone,
                Some(S::Terminated),
            ),
            (S::Terminating, f, None),
            (S::Terminating, E::Archive, None),
            (S::Terminated, E::ProviderCreated, None),
            (S::Terminated, E::IpAssigned, None),
            (S::Terminated, E::EngineReady, None),
            (S::Terminated, E::HeartbeatsMissed, None),
            (S::Terminated, E::HealthRestored, None),
            (S::Terminated, E::AgentRecovered, None),
            (S::Terminated, E::TerminateRequested, None),
            (S::Terminated, E::DrainComplete, None),
            (S::Terminated, E::ProviderConfirmedGone, None),
            (S::Terminated, f, None),
            (S::Terminated, E::Archive, Some(S::Archived)),
            (S::Failed, E::ProviderCreated, None),
            (S::Failed, E::IpAssigned, None),
            (S::Failed, E::EngineReady, None),
            (S::Failed, E::HeartbeatsMissed, None),
            (S::Failed, E::HealthRestored, None),
            (S::Failed, E::AgentRecovered, Some(S::Starting)),
            (S::Failed, E::TerminateRequested, Some(S::Terminating)),
            (S::Failed, E::DrainComplete, None),
            (S::Failed, E::ProviderConfirmedGone, None),
            (S::Failed, f, None),
            (S::Failed, E::Archive, Some(S::Archived)),
            (S::Archived, E::ProviderCreated, None),
            (S::Archived, E::IpAssigned, None),
            (S::Archived, E::EngineReady, None),
            (S::Archived, E::HeartbeatsMissed, None),
            (S::Archived, E::HealthRestored, None),
            (S::Archived, E::AgentRecovered, None),
            (S::Archived, E::TerminateRequested, None),
            (S::Archived, E::DrainComplete, None),
            (S::Archived, E::ProviderConfirmedGone, None),
            (S::Archived, f, None),
            (S::Archived, E::Archive, None),
        ];
        assert_eq!(
            table.len(),
            S::ALL.len() * E::ALL.len(),
            "the table must list every (status, event) pair"
        );
        for s in S::ALL {
            for e in E::ALL {
                let row = table
                    .iter()
                    .find(|(ts, te, _)| *ts == s && *te == e)
                    .unwrap_or_else(|| panic!("missing row for ({s}, {e:?})"));
                match (transition(s, e), row.2) {
                    (Ok(got), Some(want)) => assert_eq!(got, want, "({s}, {e:?})"),
                    (Err(err), None) => {
                        assert_eq!(err.from, s);
                        assert_eq!(err.event, e);
                    }
                    (got, want) => panic!("({s}, {e:?}): got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn every_failure_reason_fails_a_live_instance() {
        for r in FailureReason::ALL {
            assert_eq!(transition(S::Starting, E::Fail(r)), Ok(S::Failed));
            assert_eq!(r.as_str().parse::<FailureReason>(), Ok(r));
        }
    }

    #[test]
    fn terminal_states_accept_only_archive() {
        for s in S::TERMINAL {
            for e in E::ALL {
                if let Ok(next) = transition(s, e) {
                    assert_eq!((s, next), (S::Terminated, S::Archived));
                }
            }
        }
    }

    #[test]
    fn status_serialises_lowercase_and_parses_back() {
        for s in S::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(s.as_str().parse::<S>(), Ok(s));
        }
        assert!("Ready".parse::<S>().is_err());
    }

    #[test]
    fn progress_rises_monotonically_along_the_happy_path() {
        let mut m = Milestones::default();
        let mut seen = vec![progress(S::Provisioning, m)];
        m.provider_created = true;
        seen.push(progress(S::Provisioning, m));
        seen.push(progress(S::Booting, m));
        m.ip_assigned = true;
        seen.push(progress(S::Booting, m));
        seen.push(progress(S::Starting, m));
        m.agent_registered = true;
        seen.push(progress(S::Starting, m));
        m.engine_started = true;
        seen.push(progress(S::Starting, m));
        seen.push(progress(S::Ready, m));
        assert_eq!(seen, vec![5, 25, 30, 40, 50, 60, 75, 100]);
        assert_eq!(progress(S::Terminated, m), 100);
        assert!(progress(S::Draining, m) < progress(S::Terminating, m));
    }
}
