//! Human-readable output: tables and durations.

use chrono::{DateTime, Utc};
use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use gpufleet_api::views::{DeploymentEventView, DeploymentView, InstanceView, TimelineEntryView};

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

/// Deployments, one per row.
pub fn deployments_table(deployments: &[DeploymentView]) -> Table {
    let now = Utc::now();
    let mut t = table(&[
        "ID", "NAME", "MODEL", "STATE", "REPLICAS", "READY", "STATUS", "AGE",
    ]);
    for d in deployments {
        t.add_row(vec![
            d.id.to_string(),
            d.name.clone(),
            d.model.clone(),
            d.state.as_str().to_string(),
            format!(
                "{} ({}..{})",
                d.status.desired, d.replicas.min, d.replicas.max
            ),
            format!("{}/{}", d.status.ready, d.status.desired),
            d.status.summary.clone(),
            age(d.created_at, now),
        ]);
    }
    t
}

/// `key: value` lines of one deployment, then its instances.
pub fn deployment_details(d: &DeploymentView) -> String {
    let placements: Vec<String> = d.placements.iter().map(|p| p.to_string()).collect();
    let a = &d.autoscaling;
    let mut rows: Vec<(&str, String)> = vec![
        ("id", d.id.to_string()),
        ("name", d.name.clone()),
        ("model", d.model.clone()),
        ("state", d.state.as_str().to_string()),
        ("placements", placements.join(", then ")),
        (
            "replicas",
            format!(
                "{} desired ({} to {})",
                d.status.desired, d.replicas.min, d.replicas.max
            ),
        ),
        (
            "autoscaling",
            format!(
                "{} target {} per replica, scale down after {}",
                a.metric, a.target_per_replica, a.scale_down_delay
            ),
        ),
        ("status", d.status.summary.clone()),
    ];
    if let Some(z) = d.scale_to_zero_after {
        rows.push(("scale to zero after", z.to_string()));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:>20}: {v}\n"));
    }
    for c in &d.status.conditions {
        out.push_str(&format!("{:>20}  - {c}\n", ""));
    }
    if let Some(instances) = &d.instances {
        if !instances.is_empty() {
            out.push('\n');
            out.push_str(&instances_table(instances).to_string());
            out.push('\n');
        }
    }
    out
}

/// A deployment's timeline.
pub fn deployment_timeline_table(events: &[DeploymentEventView]) -> Table {
    let mut t = table(&["AT", "ACTION", "OUTCOME", "MESSAGE"]);
    for e in events {
        t.add_row(vec![
            e.at.format("%H:%M:%S%.3f").to_string(),
            e.action.as_str().to_string(),
            e.outcome.clone(),
            e.message.clone(),
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
