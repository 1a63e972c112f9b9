//! Human-readable output: tables and durations.

use chrono::{DateTime, Utc};
use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use gpufleet_api::views::{InstanceView, TimelineEntryView};

/// A borderless table with the given header.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    t
}

/// "3s", "5m", "2h", "4d".
pub fn age(since: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - since).num_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn dash(s: Option<String>) -> String {
    s.unwrap_or_else(|| "-".to_string())
}

pub fn instances_table(instances: &[InstanceView]) -> Table {
    let now = Utc::now();
    let mut t = table(&[
        "ID", "STATUS", "PROGRESS", "PROVIDER", "ZONE", "TYPE", "MODEL", "IP", "AGE",
    ]);
    for i in instances {
        let status = match i.status_reason {
            Some(r) => format!("{} ({})", i.status, r.as_str()),
            None => i.status.to_string(),
        };
        t.add_row(vec![
            i.id.to_string(),
            status,
            format!("{}%", i.progress),
            i.provider.clone(),
            i.zone.clone(),
            i.instance_type.clone(),
            i.model.clone(),
            dash(i.ip.map(|ip| ip.to_string())),
            age(i.created_at, now),
        ]);
    }
    t
}

/// `key: value` lines of one instance.
pub fn instance_details(i: &InstanceView) -> String {
    let ts = |t: Option<DateTime<Utc>>| dash(t.map(|t| t.to_rfc3339()));
    let rows: Vec<(&str, String)> = vec![
        ("id", i.id.to_string()),
        ("status", i.status.to_string()),
        (
            "reason",
            dash(i.status_reason.map(|r| r.as_str().to_string())),
        ),
        ("message", dash(i.status_message.clone())),
        ("progress", format!("{}%", i.progress)),
        ("provider", i.provider.clone()),
        ("provider id", dash(i.provider_instance_id.clone())),
        ("zone", i.zone.clone()),
        ("type", i.instance_type.clone()),
        ("model", i.model.clone()),
        ("ip", dash(i.ip.map(|ip| ip.to_string()))),
        ("created", i.created_at.to_rfc3339()),
        ("ready", ts(i.ready_at)),
        ("terminated", ts(i.terminated_at)),
        ("last heartbeat", ts(i.last_heartbeat_at)),
        ("generation", i.generation.to_string()),
    ];
    rows.into_iter()
        .map(|(k, v)| format!("{k:<15} {v}\n"))
        .collect()
}

pub fn timeline_table(events: &[TimelineEntryView]) -> Table {
    let mut t = table(&[
        "AT", "KIND", "ACTION", "OUTCOME", "CHANGE", "DURATION", "MESSAGE",
    ]);
    for e in events {
        let change = match (e.from_status, e.to_status) {
            (Some(f), Some(to)) => format!("{f} → {to}"),
            (None, Some(to)) => format!("→ {to}"),
            _ => String::new(),
        };
        let message = match &e.error_code {
            Some(code) => format!("{} [{code}]", e.message),
            None => e.message.clone(),
        };
        t.add_row(vec![
            e.at.format("%H:%M:%S%.3f").to_string(),
            e.kind.clone(),
            e.action.clone(),
            e.outcome.clone(),
            change,
            e.duration_ms.map(|d| format!("{d} ms")).unwrap_or_default(),
            message,
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        let now = Utc::now();
        assert_eq!(age(now - chrono::Duration::seconds(5), now), "5s");
        assert_eq!(age(now - chrono::Duration::seconds(125), now), "2m");
        assert_eq!(age(now - chrono::Duration::hours(3), now), "3h");
        assert_eq!(age(now + chrono::Duration::seconds(3), now), "0s");
    }
}
