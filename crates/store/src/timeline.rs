//! The `instance_events` table: the instance timeline.

use crate::rows::{corrupt, millis, RowReader};
use crate::{NewTimelineEvent, Store, StoreError, TimelineEvent};
use gpufleet_domain::InstanceId;
use sqlx::any::AnyRow;
use sqlx::AnyConnection;

pub(crate) async fn insert_event(
    conn: &mut AnyConnection,
    e: &NewTimelineEvent,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO instance_events (instance_id, at, kind, action, outcome, from_status, \
         to_status, duration_ms, error_code, message, metadata) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(e.instance_id.to_string())
    .bind(millis(e.at))
    .bind(e.kind.as_str())
    .bind(e.action.as_str())
    .bind(e.outcome.as_str())
    .bind(e.from_status.map(|s| s.as_str()))
    .bind(e.to_status.map(|s| s.as_str()))
    .bind(e.duration_ms)
    .bind(e.error_code.as_deref())
    .bind(e.message.as_str())
    .bind(e.metadata.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

fn decode_event(row: &AnyRow) -> Result<TimelineEvent, StoreError> {
    let mut r = RowReader::new(row, "instance_events row");
    let id: i64 = r.get("id")?;
    r.set_ctx(format!("instance_events row {id}"));
    let metadata: String = r.get("metadata")?;
    let metadata = serde_json::from_str(&metadata)
        .map_err(|e| corrupt(format!("instance_events row {id}: column metadata: {e}")))?;
    Ok(TimelineEvent {
        id,
        event: NewTimelineEvent {
            instance_id: r.parsed("instance_id")?,
            at: r.time("at")?,
            kind: r.parsed("kind")?,
            action: r.get("action")?,
            outcome: r.parsed("outcome")?,
            from_status: r.parsed_opt("from_status")?,
            to_status: r.parsed_opt("to_status")?,
            duration_ms: r.get("duration_ms")?,
            error_code: r.get("error_code")?,
            message: r.get("message")?,
            metadata,
        },
    })
}

impl Store {
    /// Append timeline events without touching the instance (one transaction).
    pub async fn append_events(&self, events: &[NewTimelineEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for e in events {
            insert_event(&mut tx, e).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Oldest first; `after_id` for paging (events with a larger id only).
    /// A negative `limit` is treated as 0.
    pub async fn list_events(
        &self,
        id: InstanceId,
        after_id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TimelineEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, instance_id, at, kind, action, outcome, from_status, to_status, \
             duration_ms, error_code, message, metadata \
             FROM instance_events WHERE instance_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(id.to_string())
        // Ids start at 1, so 0 means "from the beginning".
        .bind(after_id.unwrap_or(0))
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_event).collect()
    }
}
