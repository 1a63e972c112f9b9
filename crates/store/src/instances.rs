//! The `instances` table: insert, read, list, compare-and-swap update.

use crate::rows::{bind_opt_f64, corrupt, flag, millis, millis_opt, RowReader};
use crate::timeline::insert_event;
use crate::{
    Fence, InstanceFilter, InstanceRecord, NewInstance, NewTimelineEvent, Outcome, Store,
    StoreError, TimelineKind,
};
use gpufleet_domain::{InstanceId, InstanceStatus, Milestones};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;

/// Generation of a freshly inserted instance.
const FIRST_GENERATION: i64 = 1;

/// Every column an [`InstanceRecord`] is read from (not the secret hash).
pub(crate) const INSTANCE_COLUMNS: &str =
    "id, provider, zone, instance_type, model, status, status_reason, \
     status_message, milestone_provider_created, milestone_ip_assigned, \
     milestone_agent_registered, milestone_engine_started, idempotency_key, \
     provider_instance_id, ip, generation, provision_attempts, next_attempt_at, \
     startup_deadline_at, created_at, updated_at, status_changed_at, ready_at, \
     terminate_requested_at, terminated_at, cleanup_started_at, cleaned_up_at, \
     last_heartbeat_seq, last_heartbeat_at, engine_status, engine_cert_pem, deployment_id, \
     engine_args, project_id, price_per_hour, billing_started_at, billing_ended_at";

pub(crate) fn decode_instance(row: &AnyRow) -> Result<InstanceRecord, StoreError> {
    let mut r = RowReader::new(row, "instances row");
    let id: InstanceId = r.parsed("id")?;
    r.set_ctx(format!("instances row {id}"));
    let ip: Option<String> = r.get("ip")?;
    let ip = ip
        .map(|s| {
            s.parse()
                .map_err(|e| corrupt(format!("instances row {id}: column ip: {s:?}: {e}")))
        })
        .transpose()?;
    Ok(InstanceRecord {
        id,
        provider: r.parsed("provider")?,
        zone: r.get("zone")?,
        instance_type: r.get("instance_type")?,
        model: r.parsed("model")?,
        status: r.parsed("status")?,
        status_reason: r.parsed_opt("status_reason")?,
        status_message: r.get("status_message")?,
        milestones: Milestones {
            provider_created: r.flag("milestone_provider_created")?,
            ip_assigned: r.flag("milestone_ip_assigned")?,
            agent_registered: r.flag("milestone_agent_registered")?,
            engine_started: r.flag("milestone_engine_started")?,
        },
        idempotency_key: r.get("idempotency_key")?,
        provider_instance_id: r
            .get::<Option<String>>("provider_instance_id")?
            .map(gpufleet_domain::ProviderInstanceId::new),
        ip,
        generation: r.get("generation")?,
        provision_attempts: r.int("provision_attempts")?,
        next_attempt_at: r.time_opt("next_attempt_at")?,
        startup_deadline_at: r.time("startup_deadline_at")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
        status_changed_at: r.time("status_changed_at")?,
        ready_at: r.time_opt("ready_at")?,
        terminate_requested_at: r.time_opt("terminate_requested_at")?,
        terminated_at: r.time_opt("terminated_at")?,
        cleanup_started_at: r.time_opt("cleanup_started_at")?,
        cleaned_up_at: r.time_opt("cleaned_up_at")?,
        last_heartbeat_seq: r.get("last_heartbeat_seq")?,
        last_heartbeat_at: r.time_opt("last_heartbeat_at")?,
        engine_status: r.serde_enum_opt("engine_status")?,
        engine_cert_pem: r.get("engine_cert_pem")?,
        deployment_id: r.parsed_opt("deployment_id")?,
        engine_args: {
            let raw: Option<String> = r.get("engine_args")?;
            match raw {
                None => None,
                Some(t) => Some(serde_json::from_str(&t).map_err(|e| {
                    crate::rows::corrupt(format!("instances row: column engine_args: {e}"))
                })?),
            }
        },
        project_id: r.parsed("project_id")?,
        price_per_hour: r.get("price_per_hour")?,
        billing_started_at: r.time_opt("billing_started_at")?,
        billing_ended_at: r.time_opt("billing_ended_at")?,
    })
}

async fn fetch_instance(
    conn: &mut AnyConnection,
    id: InstanceId,
) -> Result<Option<InstanceRecord>, StoreError> {
    let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode_instance).transpose()
}

/// The timeline entry that opens every instance's history.
fn created_event(n: &NewInstance) -> NewTimelineEvent {
    NewTimelineEvent {
        instance_id: n.id,
        at: n.created_at,
        kind: TimelineKind::Transition,
        action: "instance.created".to_string(),
        outcome: Outcome::Success,
        from_status: None,
        to_status: Some(InstanceStatus::Provisioning),
        duration_ms: None,
        error_code: None,
        message: "instance recorded; provision intent persisted".to_string(),
        metadata: serde_json::json!({
            "provider": n.provider.as_str(),
            "zone": n.zone,
            "instance_type": n.instance_type,
            "model": n.model.as_str(),
            "idempotency_key": n.idempotency_key,
            "deployment_id": n.deployment_id.map(|d| d.to_string()),
            "project_id": n.project_id.as_str(),
        }),
    }
}

impl Store {
    /// Insert instances (status `provisioning`, generation 1) and their
    /// "created" timeline events in one transaction.
    pub async fn insert_instances(
        &self,
        new: &[NewInstance],
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let out = insert_rows(&mut tx, new).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Move an instance to another project (what `gpufleet bench router
    /// --projects` sets up before the instances are ready). The change is
    /// not published: the next lifecycle write carries it. Returns whether
    /// the instance exists.
    pub async fn set_instance_project(
        &self,
        id: InstanceId,
        project: &gpufleet_domain::ProjectId,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE instances SET project_id = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(project.as_str())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn get_instance(&self, id: InstanceId) -> Result<Option<InstanceRecord>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        fetch_instance(&mut conn, id).await
    }

    /// Newest first (`created_at DESC, id DESC`). Archived instances are left
    /// out unless `include_archived` is set or `statuses` names `archived`.
    /// A negative `limit` is treated as 0.
    pub async fn list_instances(
        &self,
        filter: &InstanceFilter,
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        let mut conds: Vec<String> = Vec::new();
        let mut texts: Vec<&'static str> = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if !filter.statuses.is_empty() {
            let mut ph = Vec::new();
            for s in &filter.statuses {
                ph.push(next());
                texts.push(s.as_str());
            }
            conds.push(format!("status IN ({})", ph.join(", ")));
        } else if !filter.include_archived {
            conds.push(format!("status <> {}", next()));
            texts.push(InstanceStatus::Archived.as_str());
        }
        let provider_ph = filter.provider.as_ref().map(|_| next());
        if let Some(ph) = &provider_ph {
            conds.push(format!("provider = {ph}"));
        }
        if let Some(projects) = &filter.projects {
            if projects.is_empty() {
                conds.push("1 = 0".to_string());
            } else {
                let ph: Vec<String> = projects.iter().map(|_| next()).collect();
                conds.push(format!("project_id IN ({})", ph.join(", ")));
            }
        }
        let limit_ph = filter.limit.map(|_| next());
        let mut sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances");
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC");
        if let Some(ph) = &limit_ph {
            sql.push_str(&format!(" LIMIT {ph}"));
        }
        let mut q = sqlx::query(&sql);
        for t in texts {
            q = q.bind(t);
        }
        if let Some(p) = &filter.provider {
            q = q.bind(p.as_str());
        }
        for p in filter.projects.iter().flatten() {
            q = q.bind(p.as_str());
        }
        if let Some(l) = filter.limit {
            q = q.bind(l.max(0));
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(decode_instance).collect()
    }

    /// Count of instances per status (archived included): every status of
    /// [`InstanceStatus::ALL`], in that order, with 0 where there is none.
    pub async fn count_by_status(&self) -> Result<Vec<(InstanceStatus, i64)>, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM instances GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut counts: Vec<(InstanceStatus, i64)> =
            InstanceStatus::ALL.iter().map(|s| (*s, 0)).collect();
        for row in &rows {
            let r = RowReader::new(row, "instances status count");
            let status: InstanceStatus = r.parsed("status")?;
            let n: i64 = r.get("n")?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == status) {
                slot.1 = n;
            }
        }
        Ok(counts)
    }

    /// Write the lifecycle columns of `next` if the row's generation is still
    /// `next.generation`, bumping it by one, and append `events`, in one
    /// transaction. Heartbeat columns of `next` are ignored, and so are the
    /// columns fixed at creation (`provider`, `zone`, `instance_type`, `model`,
    /// `idempotency_key`, `created_at`). `updated_at` is written as given.
    /// Returns the stored record, or `Conflict` (nothing written), or
    /// `NotFound`.
    pub async fn update_instance(
        &self,
        next: &InstanceRecord,
        events: &[NewTimelineEvent],
    ) -> Result<InstanceRecord, StoreError> {
        self.update_instance_fenced(next, events, None).await
    }

    /// [`Store::update_instance`], written only while `fence` (a lease
    /// holder's token) is still valid: otherwise nothing is written and the
    /// answer is `Fenced`. On PostgreSQL the lease row is share-locked until
    /// commit, so the lease cannot change hands between the check and the
    /// write.
    pub async fn update_instance_fenced(
        &self,
        next: &InstanceRecord,
        events: &[NewTimelineEvent],
        fence: Option<&Fence>,
    ) -> Result<InstanceRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let m = next.milestones;
        let mut sql = String::from(
            "UPDATE instances SET status = $3, status_reason = $4, status_message = $5, \
             milestone_provider_created = $6, milestone_ip_assigned = $7, \
             milestone_agent_registered = $8, milestone_engine_started = $9, \
             provider_instance_id = $10, ip = $11, generation = generation + 1, \
             provision_attempts = $12, next_attempt_at = $13, startup_deadline_at = $14, \
             updated_at = $15, status_changed_at = $16, ready_at = $17, \
             terminate_requested_at = $18, terminated_at = $19, cleanup_started_at = $20, \
             cleaned_up_at = $21, engine_cert_pem = $22, billing_started_at = $23, \
             billing_ended_at = $24 \
             WHERE id = $1 AND generation = $2",
        );
        if fence.is_some() {
            sql.push_str(" AND ");
            sql.push_str(&self.fence_condition(25));
        }
        let mut q = sqlx::query(&sql)
            .bind(next.id.to_string())
            .bind(next.generation)
            .bind(next.status.as_str())
            .bind(next.status_reason.map(|r| r.as_str()))
            .bind(next.status_message.as_deref())
            .bind(flag(m.provider_created))
            .bind(flag(m.ip_assigned))
            .bind(flag(m.agent_registered))
            .bind(flag(m.engine_started))
            .bind(
                next.provider_instance_id
                    .as_ref()
                    .map(|p| p.as_str().to_string()),
            )
            .bind(next.ip.map(|ip| ip.to_string()))
            .bind(i64::from(next.provision_attempts))
            .bind(millis_opt(next.next_attempt_at))
            .bind(millis(next.startup_deadline_at))
            .bind(millis(next.updated_at))
            .bind(millis(next.status_changed_at))
            .bind(millis_opt(next.ready_at))
            .bind(millis_opt(next.terminate_requested_at))
            .bind(millis_opt(next.terminated_at))
            .bind(millis_opt(next.cleanup_started_at))
            .bind(millis_opt(next.cleaned_up_at))
            .bind(next.engine_cert_pem.as_deref())
            .bind(millis_opt(next.billing_started_at))
            .bind(millis_opt(next.billing_ended_at));
        if let Some(f) = fence {
            q = f.bind(q);
        }
        let updated = q.execute(&mut *tx).await?.rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            let generation: Option<i64> =
                sqlx::query_scalar("SELECT generation FROM instances WHERE id = $1")
                    .bind(next.id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
            return Err(match generation {
                Some(g) if g == next.generation && fence.is_some() => StoreError::Fenced {
                    lease: fence.map(|f| f.name.clone()).unwrap_or_default(),
                },
                Some(_) => StoreError::Conflict {
                    id: next.id,
                    expected: next.generation,
                },
                None => StoreError::NotFound { id: next.id },
            });
        }
        for e in events {
            insert_event(&mut tx, e).await?;
        }
        let rec = fetch_instance(&mut tx, next.id)
            .await?
            .ok_or(StoreError::NotFound { id: next.id })?;
        tx.commit().await?;
        Ok(rec)
    }
}

/// Insert `new` and their "created" events on `conn` (in a transaction);
/// the records as stored.
pub(crate) async fn insert_rows(
    conn: &mut AnyConnection,
    new: &[NewInstance],
) -> Result<Vec<InstanceRecord>, StoreError> {
    for n in new {
        let created = millis(n.created_at);
        let q = sqlx::query(
            "INSERT INTO instances (id, provider, zone, instance_type, model, status, \
             idempotency_key, bootstrap_secret_hash, generation, provision_attempts, \
             startup_deadline_at, created_at, updated_at, status_changed_at, deployment_id, \
             engine_args, project_id, price_per_hour) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11, $11, $11, $12, $13, $14, $15)",
        )
        .bind(n.id.to_string())
        .bind(n.provider.as_str())
        .bind(n.zone.as_str())
        .bind(n.instance_type.as_str())
        .bind(n.model.as_str())
        .bind(InstanceStatus::Provisioning.as_str())
        .bind(n.idempotency_key.as_str())
        .bind(n.bootstrap_secret_hash.as_str())
        .bind(FIRST_GENERATION)
        .bind(millis(n.startup_deadline_at))
        .bind(created)
        .bind(n.deployment_id.map(|d| d.to_string()))
        .bind(
            n.engine_args
                .as_ref()
                .map(|a| serde_json::to_string(a).unwrap_or_else(|_| "[]".into())),
        )
        .bind(n.project_id.as_str());
        bind_opt_f64(q, n.price_per_hour)
            .execute(&mut *conn)
            .await?;
        insert_event(conn, &created_event(n)).await?;
    }
    let mut out = Vec::with_capacity(new.len());
    for n in new {
        let rec = fetch_instance(conn, n.id)
            .await?
            .ok_or(StoreError::NotFound { id: n.id })?;
        out.push(rec);
    }
    Ok(out)
}
