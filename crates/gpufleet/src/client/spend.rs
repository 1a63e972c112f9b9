//! `gpufleet spend [--from] [--to] [--group-by] [--step] [--project]`: what
//! the machines cost over a range, per group, with the tokens they served
//! and the cost per million tokens (`GET /api/v1/spend`).

use super::render::table;
use super::{print_json, Client};
use chrono::{DateTime, SecondsFormat, Utc};
use comfy_table::Table;
use gpufleet_api::views::SpendView;
use gpufleet_domain::spend::{GroupBy, SpendStep};
use gpufleet_domain::ProjectId;
use reqwest::Method;

/// Arguments of `spend`.
#[derive(Debug, Clone, clap::Args)]
pub struct SpendArgs {
    /// Start of the range: RFC 3339 (e.g. 2025-01-01T00:00:00Z) or how long
    /// ago (e.g. 30d, 12h) [default: `to` − 7 days].
    #[arg(long)]
    pub from: Option<String>,
    /// End of the range: RFC 3339 or how long ago [default: now].
    #[arg(long)]
    pub to: Option<String>,
    /// Group by project, deployment, model or provider [default: project].
    #[arg(long)]
    pub group_by: Option<GroupBy>,
    /// Bucket width of the series (`1h` or `1d`; only in --json) [default: 1h
    /// when the range allows, else 1d].
    #[arg(long)]
    pub step: Option<SpendStep>,
    /// Only this project.
    #[arg(long)]
    pub project: Option<ProjectId>,
}

/// `30d` → the RFC 3339 time 30 days before `now`; anything else as given
/// (the server checks it and names the field).
fn time_arg(raw: &str, now: DateTime<Utc>) -> String {
    match super::instances::parse_duration(raw) {
        Ok(ago) if raw.trim().ends_with(|c: char| c.is_ascii_alphabetic()) => {
            let ago = chrono::Duration::from_std(ago).unwrap_or(chrono::Duration::MAX);
            now.checked_sub_signed(ago)
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
                .to_rfc3339_opts(SecondsFormat::Millis, true)
        }
        _ => raw.to_string(),
    }
}

impl SpendArgs {
    fn query(&self, now: DateTime<Utc>) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(v) = &self.from {
            q.push(("from", time_arg(v, now)));
        }
        if let Some(v) = &self.to {
            q.push(("to", time_arg(v, now)));
        }
        if let Some(v) = self.group_by {
            q.push(("group_by", v.to_string()));
        }
        if let Some(v) = self.step {
            q.push(("step", v.to_string()));
        }
        if let Some(v) = &self.project {
            q.push(("project", v.to_string()));
        }
        q
    }
}

/// A cost as the table prints it (4 decimals: a few minutes of a cheap
/// machine still shows).
pub fn money(v: f64) -> String {
    format!("{v:.4}")
}

fn hours(v: f64) -> String {
    format!("{v:.2}")
}

fn per_million(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), money)
}

/// The table: one row per group, then the total.
pub fn spend_table(s: &SpendView) -> Table {
    let mut t = table(&[
        &s.group_by.to_string().to_uppercase(),
        &format!("COST ({})", s.currency),
        "GPU HOURS",
        "TOKENS",
        "COST / M TOKENS",
    ]);
    for g in &s.groups {
        t.add_row(vec![
            g.key.clone(),
            money(g.cost),
            hours(g.gpu_hours),
            (g.prompt_tokens + g.completion_tokens).to_string(),
            per_million(g.cost_per_million_tokens),
        ]);
    }
    let total = &s.total;
    t.add_row(vec![
        "TOTAL".to_string(),
        money(total.cost),
        hours(total.gpu_hours),
        (total.prompt_tokens + total.completion_tokens).to_string(),
        per_million(total.cost_per_million_tokens),
    ]);
    t
}

/// What `spend` prints (without `--json`).
pub fn render(s: &SpendView) -> String {
    let mut out = format!(
        "spend from {} to {}, by {}\n{}\n",
        s.from.format("%Y-%m-%d %H:%M:%S UTC"),
        s.to.format("%Y-%m-%d %H:%M:%S UTC"),
        s.group_by,
        spend_table(s)
    );
    if s.unpriced_instances > 0 {
        out.push_str(&format!(
            "note: {} instance(s) have no known price (created before prices were kept) and count 0\n",
            s.unpriced_instances
        ));
    }
    if s.gpu_count_unknown_instances > 0 {
        out.push_str(&format!(
            "note: {} instance(s) are of a type whose GPU count is unknown; not in GPU hours\n",
            s.gpu_count_unknown_instances
        ));
    }
    out
}

pub async fn run(client: &Client, args: SpendArgs) -> anyhow::Result<()> {
    let view: SpendView = client
        .send(
            client
                .request(Method::GET, "/api/v1/spend")
                .query(&args.query(Utc::now())),
        )
        .await?;
    if client.json {
        return print_json(&view);
    }
    print!("{}", render(&view));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use gpufleet_api::views::{SpendGroupView, SpendSeriesView, SpendTotalView};

    #[test]
    fn the_table_has_a_row_per_group_and_the_total() {
        let from = Utc.with_ymd_and_hms(2025, 1, 31, 10, 0, 0).unwrap();
        let to = Utc.with_ymd_and_hms(2025, 1, 31, 13, 0, 0).unwrap();
        let view = SpendView {
            from,
            to,
            step: SpendStep::Hour,
            group_by: GroupBy::Model,
            currency: "EUR".into(),
            total: SpendTotalView {
                cost: 16.8,
                gpu_hours: 3.75,
                instance_hours: 3.75,
                prompt_tokens: 1_400_000,
                completion_tokens: 1_200_000,
                cost_per_million_tokens: Some(16.8 / 2.6),
            },
            groups: vec![SpendGroupView {
                key: "gpufleet/sim-small".into(),
                cost: 1.8,
                gpu_hours: 0.75,
                instance_hours: 0.75,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_per_million_tokens: None,
                series: SpendSeriesView {
                    timestamps: vec![from],
                    cost: vec![1.8],
                },
            }],
            unpriced_instances: 1,
            gpu_count_unknown_instances: 0,
        };
        let text = render(&view);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with(
            "spend from 2025-01-31 10:00:00 UTC to 2025-01-31 13:00:00 UTC, by model"
        ));
        assert!(
            lines[1].contains("MODEL") && lines[1].contains("COST (EUR)"),
            "{text}"
        );
        let small: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(small, ["gpufleet/sim-small", "1.8000", "0.75", "0", "-"]);
        let total: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(total, ["TOTAL", "16.8000", "3.75", "2600000", "6.4615"]);
        assert!(lines[4].starts_with("note: 1 instance(s) have no known price"));
    }

    #[test]
    fn arguments_become_the_query() {
        let args = SpendArgs {
            from: Some("2025-01-01T00:00:00Z".into()),
            to: None,
            group_by: Some(GroupBy::Provider),
            step: Some(SpendStep::Day),
            project: Some("research".parse().unwrap()),
        };
        let now = Utc.with_ymd_and_hms(2025, 2, 1, 12, 0, 0).unwrap();
        assert_eq!(
            args.query(now),
            vec![
                ("from", "2025-01-01T00:00:00Z".to_string()),
                ("group_by", "provider".to_string()),
                ("step", "1d".to_string()),
                ("project", "research".to_string()),
            ]
        );
        // How long ago, made a time here; anything else goes as given.
        let args = SpendArgs {
            from: Some("30d".into()),
            to: Some("90m".into()),
            group_by: None,
            step: None,
            project: None,
        };
        assert_eq!(
            args.query(now),
            vec![
                ("from", "2025-01-02T12:00:00.000Z".to_string()),
                ("to", "2025-02-01T10:30:00.000Z".to_string()),
            ]
        );
        assert_eq!(time_arg("yesterday", now), "yesterday");
        assert_eq!(time_arg("5", now), "5");
    }
}
