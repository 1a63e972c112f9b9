//! The one write path for instance records: compare-and-swap on
//! `generation`, the timeline entries that explain a change in the same
//! transaction, and the change published on the bus after the commit.
//! Commands ([`crate::Fleet`]), the agent service and the reconcilers all
//! write through here; every status change goes through [`Lifecycle::apply`].

use crate::bus::{Bus, ChangeKind, InstanceChange};
use crate::error::ControlError;
use crate::timeline::{self, EntryExt};
use chrono::{DateTime, Utc};
use gpufleet_domain::{transition, FailureReason, InstanceId, InstanceStatus, LifecycleEvent};
use gpufleet_store::{
    IdempotencyClaim, InsertOnce, InstanceRecord, NewInstance, NewTimelineEvent, Outcome, Store,
    StoreError,
};
use tokio::sync::broadcast;

/// How many times a write retries a compare-and-swap that lost a race.
pub(crate) const CAS_RETRIES: usize = 8;

/// Writes instance records and publishes them. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    store: Store,
    bus: Bus,
}

impl Lifecycle {
    pub fn new(store: Store, bus: Bus) -> Self {
        Self { store, bus }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Instance changes as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<InstanceChange> {
        self.bus.subscribe()
    }

    /// The bus changes are published on.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The instance as stored; `NotFound` if there is none.
    pub async fn get(&self, id: InstanceId) -> Result<InstanceRecord, ControlError> {
        self.store
            .get_instance(id)
            .await?
            .ok_or_else(|| ControlError::not_found("instance", id))
    }

    /// [`Lifecycle::insert`] at most once per `claim`'s key; publishes what
    /// it inserted.
    pub async fn insert_once(
        &self,
        new: &[NewInstance],
        claim: &IdempotencyClaim,
    ) -> Result<InsertOnce, ControlError> {
        let done = self.store.insert_instances_once(new, claim).await?;
        if let InsertOnce::Inserted(created) = &done {
            for rec in created {
                self.bus.publish(ChangeKind::Created, rec.clone());
            }
        }
        Ok(done)
    }

    /// Insert new instances and publish each.
    pub async fn insert(&self, new: &[NewInstance]) -> Result<Vec<InstanceRecord>, ControlError> {
        let created = self.store.insert_instances(new).await?;
        for rec in &created {
            self.bus.publish(ChangeKind::Created, rec.clone());
        }
        Ok(created)
    }

    /// Apply a lifecycle event to `rec` (as last read): check the transition,
    /// let `mutate` adjust other fields, write with compare-and-swap together
    /// with the transition entry and `extra` entries, then publish.
    pub async fn apply(
        &self,
        rec: &InstanceRecord,
        event: LifecycleEvent,
        message: &str,
        extra: Vec<NewTimelineEvent>,
        mutate: impl FnOnce(&mut InstanceRecord),
    ) -> Result<InstanceRecord, ApplyError> {
        let to = transition(rec.status, event).map_err(ApplyError::Invalid)?;
        let now = Utc::now();
        let mut next = rec.clone();
        next.status = to;
        next.status_changed_at = now;
        next.updated_at = now;
        next.status_message = Some(message.to_string());
        match event {
            LifecycleEvent::Fail(reason) => next.status_reason = Some(reason),
            LifecycleEvent::EngineReady | LifecycleEvent::HealthRestored => {
                next.status_reason = None;
                if next.ready_at.is_none() {
                    next.ready_at = Some(now);
                }
            }
            LifecycleEvent::ProviderConfirmedGone => next.terminated_at = Some(now),
            _ => {}
        }
        mutate(&mut next);
        stamp_billing(&mut next, now);
        let mut t = timeline::transition(rec.id, now, rec.status, to, message);
        if let LifecycleEvent::Fail(reason) = event {
            t = t.error_code(reason.as_str());
            t.outcome = Outcome::Failed;
        }
        let mut events = extra;
        events.push(t);
        // Under a reconciler's lease, only while it is still held.
        let fence = crate::driver::current_fence();
        let stored = match self
            .store
            .update_instance_fenced(&next, &events, fence.as_ref())
            .await
        {
            Ok(s) => s,
            Err(StoreError::Conflict { .. }) => return Err(ApplyError::Conflict),
            Err(StoreError::Fenced { lease }) => return Err(ApplyError::Fenced(lease)),
            Err(e) => return Err(ApplyError::Store(e)),
        };
        tracing::info!(instance_id = %rec.id, from = %rec.status, to = %to, "{message}");
        self.bus.publish(ChangeKind::Updated, stored.clone());
        Ok(stored)
    }

    /// Write `next` (changed by the caller from the record as read) with
    /// compare-and-swap, with `events`, without publishing it: bookkeeping
    /// no subscriber needs (the provisioner's attempt counter and next
    /// attempt time). `Conflict` if the record changed meanwhile, `Fenced`
    /// if the reconciler's lease was lost (a replica that lost the
    /// provisioner's lease persists no attempt, so it calls no provider).
    pub async fn save(
        &self,
        next: &InstanceRecord,
        events: &[NewTimelineEvent],
    ) -> Result<InstanceRecord, StoreError> {
        let fence = crate::driver::current_fence();
        let mut next = next.clone();
        let at = next.updated_at;
        stamp_billing(&mut next, at);
        self.store
            .update_instance_fenced(&next, events, fence.as_ref())
            .await
    }

    /// Change non-status fields with compare-and-swap, re-reading on conflict.
    /// `mutate` returns false when there is nothing to change.
    pub async fn update_with_retry(
        &self,
        id: InstanceId,
        events: Vec<NewTimelineEvent>,
        mutate: impl Fn(&mut InstanceRecord) -> bool,
    ) -> Result<InstanceRecord, ControlError> {
        for _ in 0..CAS_RETRIES {
            let rec = self.get(id).await?;
            let mut next = rec.clone();
            if !mutate(&mut next) {
                if !events.is_empty() {
                    self.store.append_events(&events).await?;
                }
                return Ok(rec);
            }
            let at = Utc::now();
            next.updated_at = at;
            stamp_billing(&mut next, at);
            let fence = crate::driver::current_fence();
            match self
                .store
                .update_instance_fenced(&next, &events, fence.as_ref())
                .await
            {
                Ok(stored) => {
                    self.bus.publish(ChangeKind::Updated, stored.clone());
                    return Ok(stored);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Conflict {
            message: format!("instance {id} is changing too fast; retry"),
        })
    }
}

/// Set the billable interval from what the record now says, on every
/// write: billing starts when the provider has made the machine (the record
/// has its `provider_instance_id`) and ends when the provider said it is
/// gone (`terminated`), when failed-instance cleanup finished
/// (`cleaned_up_at`), or when the machine vanished at the provider (failed
/// `provider_deleted`). Idempotent: a bound once set never moves.
pub(crate) fn stamp_billing(next: &mut InstanceRecord, now: DateTime<Utc>) {
    if next.billing_started_at.is_none() && next.provider_instance_id.is_some() {
        next.billing_started_at = Some(now);
    }
    let Some(started) = next.billing_started_at else {
        return;
    };
    let gone = matches!(
        next.status,
        InstanceStatus::Terminated | InstanceStatus::Archived
    ) || next.cleaned_up_at.is_some()
        || (next.status == InstanceStatus::Failed
            && next.status_reason == Some(FailureReason::ProviderDeleted));
    if gone && next.billing_ended_at.is_none() {
        next.billing_ended_at = Some(now.max(started));
    }
}

/// Why [`Lifecycle::apply`] did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the instance changed concurrently")]
    Conflict,
    /// The reconciler's lease changed hands: another replica acts now.
    #[error("lease {0} was lost; another replica acts")]
    Fenced(String),
    #[error(transparent)]
    Invalid(gpufleet_domain::InvalidTransition),
    #[error(transparent)]
    Store(StoreError),
}
