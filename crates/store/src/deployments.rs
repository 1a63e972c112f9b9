//! The `deployments` and `deployment_events` tables, and the instances of a
//! deployment. Writes are compare-and-swap on `generation`, with the
//! timeline entries that explain them in the same transaction.

use crate::instances::{decode_instance, INSTANCE_COLUMNS};
use crate::rows::{corrupt, is_unique_violation, millis, millis_opt, RowReader};
use crate::{Fence, InstanceRecord, Outcome, Store, StoreError};
use chrono::{DateTime, Utc};
use gpufleet_domain::{
    DeploymentAction, DeploymentId, DeploymentSpec, DeploymentState, InstanceStatus, ModelName,
    ProjectId, ReplicaStatus,
};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;

/// Generation of a freshly inserted deployment.
const FIRST_GENERATION: i64 = 1;

const DEPLOYMENT_COLUMNS: &str = "id, name, model, spec, state, generation, desired_replicas, \
     status, created_at, updated_at, delete_requested_at, deleted_at, demand_at, project_id";

/// A deployment as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: DeploymentId,
    pub name: String,
    pub model: ModelName,
    pub spec: DeploymentSpec,
    pub state: DeploymentState,
    /// Bumped on every write (compare-and-swap token).
    pub generation: i64,
    /// The replica count the keeper last decided on.
    pub desired_replicas: u32,
    /// What the keeper last saw.
    pub status: ReplicaStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delete_requested_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// When a request last wanted the deployment's model (routers write it;
    /// [`Store::note_model_demand`]). Not written by `update_deployment`.
    pub demand_at: Option<DateTime<Utc>>,
    /// The project that owns it (not rewritten by `update_deployment`).
    #[serde(default = "ProjectId::default_project")]
    pub project_id: ProjectId,
}

/// A new deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeployment {
    pub id: DeploymentId,
    pub name: String,
    pub model: ModelName,
    pub spec: DeploymentSpec,
    pub desired_replicas: u32,
    pub created_at: DateTime<Utc>,
    pub project_id: ProjectId,
}

/// A deployment timeline entry to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewDeploymentEvent {
    pub deployment_id: DeploymentId,
    pub at: DateTime<Utc>,
    pub action: DeploymentAction,
    pub outcome: Outcome,
    /// Why, for a person.
    pub message: String,
    /// Details (instance ids, placements, figures).
    pub metadata: serde_json::Value,
}

/// A stored deployment timeline entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentEvent {
    /// Increasing per store.
    pub id: i64,
    #[serde(flatten)]
    pub event: NewDeploymentEvent,
}

fn decode_deployment(row: &AnyRow) -> Result<DeploymentRecord, StoreError> {
    let mut r = RowReader::new(row, "deployments row");
    let id: DeploymentId = r.parsed("id")?;
    r.set_ctx(format!("deployments row {id}"));
    let spec: String = r.get("spec")?;
    let spec = serde_json::from_str(&spec)
        .map_err(|e| corrupt(format!("deployments row {id}: column spec: {e}")))?;
    let status: String = r.get("status")?;
    let status = serde_json::from_str(&status)
        .map_err(|e| corrupt(format!("deployments row {id}: column status: {e}")))?;
    Ok(DeploymentRecord {
        id,
        name: r.get("name")?,
        model: r.parsed("model")?,
        spec,
        state: r.parsed("state")?,
        generation: r.get("generation")?,
        desired_replicas: r.int("desired_replicas")?,
        status,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
        delete_requested_at: r.time_opt("delete_requested_at")?,
        deleted_at: r.time_opt("deleted_at")?,
        demand_at: r.time_opt("demand_at")?,
        project_id: r.parsed("project_id")?,
    })
}

fn decode_event(row: &AnyRow) -> Result<DeploymentEvent, StoreError> {
    let mut r = RowReader::new(row, "deployment_events row");
    let id: i64 = r.get("id")?;
    r.set_ctx(format!("deployment_events row {id}"));
    let metadata: String = r.get("metadata")?;
    let metadata = serde_json::from_str(&metadata)
        .map_err(|e| corrupt(format!("deployment_events row {id}: column metadata: {e}")))?;
    Ok(DeploymentEvent {
        id,
        event: NewDeploymentEvent {
            deployment_id: r.parsed("deployment_id")?,
            at: r.time("at")?,
            action: r.parsed("action")?,
            outcome: r.parsed("outcome")?,
            message: r.get("message")?,
            metadata,
        },
    })
}

fn to_json<T: Serialize>(v: &T, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| crate::rows::unencodable(format_args!("{what}: {e}")))
}

async fn insert_event(conn: &mut AnyConnection, e: &NewDeploymentEvent) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO deployment_events (deployment_id, at, action, outcome, message, metadata) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(e.deployment_id.to_string())
    .bind(millis(e.at))
    .bind(e.action.as_str())
    .bind(e.outcome.as_str())
    .bind(e.message.as_str())
    .bind(e.metadata.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

async fn fetch(
    conn: &mut AnyConnection,
    id: DeploymentId,
) -> Result<Option<DeploymentRecord>, StoreError> {
    let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode_deployment).transpose()
}

/// A unique-index violation on the live name: `NameTaken`.
fn name_taken(e: sqlx::Error, name: &str) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::NameTaken {
            name: name.to_string(),
        }
    } else {
        StoreError::Query(e)
    }
}

impl Store {
    /// Insert a deployment (state `active`, generation 1) and its first
    /// timeline entries. `NameTaken` when a deployment not deleted has the name.
    pub async fn insert_deployment(
        &self,
        n: &NewDeployment,
        events: &[NewDeploymentEvent],
    ) -> Result<DeploymentRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let created = millis(n.created_at);
        sqlx::query(
            "INSERT INTO deployments (id, name, model, spec, state, generation, \
             desired_replicas, status, created_at, updated_at, project_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)",
        )
        .bind(n.id.to_string())
        .bind(n.name.as_str())
        .bind(n.model.as_str())
        .bind(to_json(&n.spec, "deployment spec")?)
        .bind(DeploymentState::Active.as_str())
        .bind(FIRST_GENERATION)
        .bind(i64::from(n.desired_replicas))
        .bind(to_json(&ReplicaStatus::default(), "deployment status")?)
        .bind(created)
        .bind(n.project_id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| name_taken(e, &n.name))?;
        for e in events {
            insert_event(&mut tx, e).await?;
        }
        let rec = fetch(&mut tx, n.id)
            .await?
            .ok_or_else(|| corrupt(format!("deployment {} vanished after insert", n.id)))?;
        tx.commit().await?;
        Ok(rec)
    }

    /// A request wanted `model` at `at`: move `demand_at` of its active
    /// deployments forward (never back). Returns how many moved.
    pub async fn note_model_demand(
        &self,
        model: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE deployments SET demand_at = $2 WHERE model = $1 AND state = $3 \
             AND (demand_at IS NULL OR demand_at < $2)",
        )
        .bind(model)
        .bind(millis(at))
        .bind(DeploymentState::Active.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// [`Self::note_model_demand`] for the deployments of one project.
    pub async fn note_project_model_demand(
        &self,
        project: &ProjectId,
        model: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE deployments SET demand_at = $2 WHERE model = $1 AND state = $3 \
             AND project_id = $4 AND (demand_at IS NULL OR demand_at < $2)",
        )
        .bind(model)
        .bind(millis(at))
        .bind(DeploymentState::Active.as_str())
        .bind(project.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Whether an active deployment of `project` serves `model`.
    pub async fn project_model_has_deployment(
        &self,
        project: &ProjectId,
        model: &str,
    ) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM deployments WHERE model = $1 AND state = $2 \
             AND project_id = $3",
        )
        .bind(model)
        .bind(DeploymentState::Active.as_str())
        .bind(project.as_str())
        .fetch_one(&self.pool)
        .await?;
        let n: i64 = RowReader::new(&row, "deployments count").get("n")?;
        Ok(n > 0)
    }

    /// Whether an active deployment serves `model` (so a request for it may
    /// wait for a replica rather than fail).
    pub async fn model_has_deployment(&self, model: &str) -> Result<bool, StoreError> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n FROM deployments WHERE model = $1 AND state = $2")
                .bind(model)
                .bind(DeploymentState::Active.as_str())
                .fetch_one(&self.pool)
                .await?;
        let n: i64 = RowReader::new(&row, "deployments count").get("n")?;
        Ok(n > 0)
    }

    pub async fn get_deployment(
        &self,
        id: DeploymentId,
    ) -> Result<Option<DeploymentRecord>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        fetch(&mut conn, id).await
    }

    /// Oldest first. Deleted deployments only with `include_deleted`.
    pub async fn list_deployments(
        &self,
        include_deleted: bool,
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        let mut sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments");
        if !include_deleted {
            sql.push_str(" WHERE deleted_at IS NULL");
        }
        sql.push_str(" ORDER BY created_at, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(decode_deployment).collect()
    }

    /// Write `next` if the row's generation is still `next.generation`,
    /// bumping it, and append `events`, in one transaction (only while
    /// `fence` holds, when given). `DeploymentConflict` (nothing written),
    /// `DeploymentNotFound`, `NameTaken` or `Fenced`. `id` and
    /// `created_at` are never rewritten.
    pub async fn update_deployment(
        &self,
        next: &DeploymentRecord,
        events: &[NewDeploymentEvent],
        fence: Option<&Fence>,
    ) -> Result<DeploymentRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut sql = String::from(
            "UPDATE deployments SET name = $3, model = $4, spec = $5, state = $6, \
             generation = generation + 1, desired_replicas = $7, status = $8, updated_at = $9, \
             delete_requested_at = $10, deleted_at = $11 \
             WHERE id = $1 AND generation = $2",
        );
        if fence.is_some() {
            sql.push_str(" AND ");
            sql.push_str(&self.fence_condition(12));
        }
        let mut q = sqlx::query(&sql)
            .bind(next.id.to_string())
            .bind(next.generation)
            .bind(next.name.as_str())
            .bind(next.model.as_str())
            .bind(to_json(&next.spec, "deployment spec")?)
            .bind(next.state.as_str())
            .bind(i64::from(next.desired_replicas))
            .bind(to_json(&next.status, "deployment status")?)
            .bind(millis(next.updated_at))
            .bind(millis_opt(next.delete_requested_at))
            .bind(millis_opt(next.deleted_at));
        if let Some(f) = fence {
            q = f.bind(q);
        }
        let updated = q
            .execute(&mut *tx)
            .await
            .map_err(|e| name_taken(e, &next.name))?
            .rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            let generation: Option<i64> =
                sqlx::query_scalar("SELECT generation FROM deployments WHERE id = $1")
                    .bind(next.id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
            return Err(match generation {
                Some(g) if g == next.generation && fence.is_some() => StoreError::Fenced {
                    lease: fence.map(|f| f.name.clone()).unwrap_or_default(),
                },
                Some(_) => StoreError::DeploymentConflict {
                    id: next.id,
                    expected: next.generation,
                },
                None => StoreError::DeploymentNotFound { id: next.id },
            });
        }
        for e in events {
            insert_event(&mut tx, e).await?;
        }
        let rec = fetch(&mut tx, next.id)
            .await?
            .ok_or(StoreError::DeploymentNotFound { id: next.id })?;
        tx.commit().await?;
        Ok(rec)
    }

    /// Append deployment timeline entries (one transaction).
    pub async fn append_deployment_events(
        &self,
        events: &[NewDeploymentEvent],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for e in events {
            insert_event(&mut tx, e).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Oldest first; `after_id` for paging. A negative `limit` is 0.
    pub async fn list_deployment_events(
        &self,
        id: DeploymentId,
        after_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<DeploymentEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, deployment_id, at, action, outcome, message, metadata \
             FROM deployment_events WHERE deployment_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(id.to_string())
        .bind(after_id.unwrap_or(0))
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_event).collect()
    }

    /// The deployment's instances, archived ones left out, oldest first.
    pub async fn list_deployment_instances(
        &self,
        id: DeploymentId,
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        let sql = format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE deployment_id = $1 AND status <> $2 \
             ORDER BY created_at, id"
        );
        let rows = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(InstanceStatus::Archived.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_instance).collect()
    }
}
