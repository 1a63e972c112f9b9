//! `gpufleet top`: a live terminal dashboard of the fleet (ratatui over
//! crossterm).
//!
//! Instances come from `GET /api/v1/instances` and then the SSE stream
//! `GET /api/v1/events` (status changes show at once); every 2 s each live
//! instance's newest sample is read (`/api/v1/instances/{id}/metrics?limit=1`),
//! the list is re-read (heartbeat ages, and in case the stream dropped), and
//! the fleet totals come from `GET /api/v1/metrics/fleet` when the server has it.
//!
//! Keys: `q` quits, `Esc` closes the detail (quits from the list), `↑`/`↓`
//! select, `Enter` opens or closes the selected instance's detail
//! (sparklines of what this session has seen).
//!
//! Drawing ([`draw`]) is a pure function of [`TopState`], tested on
//! ratatui's `TestBackend`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use gpufleet_api::views::{
    FleetMetricsView, InstanceList, InstanceMetrics, InstanceView, SampleView,
};
use gpufleet_domain::{InstanceId, InstanceStatus};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{execute, terminal};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Sparkline, Table, TableState};
use ratatui::Frame;
use reqwest::Method;

use super::{render, sse, Client};

/// How often figures are refreshed.
pub const REFRESH: Duration = Duration::from_secs(2);
/// Points of history kept per instance for the detail view.
const HISTORY: usize = 300;

/// Arguments of `gpufleet top`.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// Show archived and terminated instances too.
    #[arg(long)]
    pub all: bool,
}

/// What `top` knows about one instance.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub view: InstanceView,
    pub latest: Option<SampleView>,
    /// Recent samples (oldest first), one per refresh that brought a new one.
    pub history: VecDeque<SampleView>,
}

/// Everything the screen shows.
#[derive(Debug, Clone, Default)]
pub struct TopState {
    pub server: String,
    pub rows: BTreeMap<InstanceId, InstanceRow>,
    pub selected: usize,
    pub detail: bool,
    pub fleet: Option<FleetMetricsView>,
    pub show_all: bool,
    /// Last error talking to the server, shown in the footer.
    pub error: Option<String>,
    pub now: DateTime<Utc>,
}

impl TopState {
    /// Adds or updates an instance (ignoring an older generation).
    pub fn upsert(&mut self, v: InstanceView) {
        match self.rows.get_mut(&v.id) {
            Some(row) if row.view.generation > v.generation => {}
            Some(row) => row.view = v,
            None => {
                self.rows.insert(
                    v.id,
                    InstanceRow {
                        view: v,
                        latest: None,
                        history: VecDeque::new(),
                    },
                );
            }
        }
    }

    /// Records a newest sample.
    pub fn set_latest(&mut self, id: InstanceId, s: SampleView) {
        let Some(row) = self.rows.get_mut(&id) else {
            return;
        };
        if row.history.back().is_none_or(|last| last.seq != s.seq) {
            row.history.push_back(s.clone());
            while row.history.len() > HISTORY {
                row.history.pop_front();
            }
        }
        row.latest = Some(s);
    }

    /// The rows shown, in order.
    pub fn visible(&self) -> Vec<&InstanceRow> {
        let mut rows: Vec<&InstanceRow> = self
            .rows
            .values()
            .filter(|r| {
                self.show_all
                    || !matches!(
                        r.view.status,
                        InstanceStatus::Archived | InstanceStatus::Terminated
                    )
            })
            .collect();
        rows.sort_by_key(|r| (r.view.created_at, r.view.id));
        rows
    }

    pub fn selected_row(&self) -> Option<&InstanceRow> {
        self.visible().get(self.selected).copied()
    }

    /// Applies a key; false when `top` should quit.
    pub fn key(&mut self, code: KeyCode, modifiers: KeyModifiers) -> bool {
        let n = self.visible().len();
        match code {
            KeyCode::Char('q') => return false,
            KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return false,
            KeyCode::Esc if self.detail => self.detail = false,
            KeyCode::Esc => return false,
            KeyCode::Up => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down if n > 0 => self.selected = (self.selected + 1).min(n - 1),
            KeyCode::Enter if n > 0 => self.detail = !self.detail,
            _ => {}
        }
        true
    }

    /// Keeps the selection on a row after the list changed.
    fn clamp_selection(&mut self) {
        let n = self.visible().len();
        self.selected = self.selected.min(n.saturating_sub(1));
    }
}

fn dash() -> String {
    "-".to_string()
}

/// GPU figures of one sample: (mean util %, VRAM used MiB, VRAM total MiB,
/// max temp, power W); a figure no GPU knows is `None` (shown as "-").
type GpuTotals = (Option<f64>, f64, f64, Option<f64>, Option<f64>);

fn gpu_totals(s: &SampleView) -> Option<GpuTotals> {
    if s.gpus.is_empty() {
        return None;
    }
    let util: Vec<f64> = s.gpus.iter().filter_map(|g| g.util_pct).collect();
    let util = (!util.is_empty()).then(|| util.iter().sum::<f64>() / util.len() as f64);
    let used = s.gpus.iter().map(|g| g.mem_used_mib as f64).sum();
    let total = s.gpus.iter().map(|g| g.mem_total_mib as f64).sum();
    let temp = s.gpus.iter().filter_map(|g| g.temp_c).reduce(f64::max);
    let power = s.gpus.iter().filter_map(|g| g.power_w).reduce(|a, b| a + b);
    Some((util, used, total, temp, power))
}

/// `value` formatted, or "-" when unknown.
fn or_dash(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(dash, f)
}

fn header_lines(state: &TopState) -> Vec<Line<'static>> {
    let rows = state.visible();
    let ready = rows
        .iter()
        .filter(|r| r.view.status == InstanceStatus::Ready)
        .count();
    let samples: Vec<&SampleView> = rows.iter().filter_map(|r| r.latest.as_ref()).collect();
    let gpus: usize = samples.iter().map(|s| s.gpus.len()).sum();
    let util: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.gpus.iter().filter_map(|g| g.util_pct))
        .collect();
    let mean_util = (!util.is_empty()).then(|| util.iter().sum::<f64>() / util.len() as f64);
    let (used, total, power) = samples
        .iter()
        .filter_map(|s| gpu_totals(s))
        .fold((0.0, 0.0, 0.0), |(u, t, p), g| {
            (u + g.1, t + g.2, p + g.4.unwrap_or(0.0))
        });
    let running: f64 = samples.iter().map(|s| s.engine.requests_running).sum();
    let waiting: f64 = samples.iter().map(|s| s.engine.requests_waiting).sum();
    let title = format!(
        "gpufleet top — {}   {}",
        state.server,
        state.now.format("%H:%M:%S")
    );
    let mut first = format!(
        "instances {} (ready {})   GPUs {}   util {}   VRAM {:.1}/{:.1} GiB   power {:.0} W   requests {:.0} running / {:.0} waiting",
        rows.len(),
        ready,
        gpus,
        mean_util.map(|u| format!("{u:.0}%")).unwrap_or_else(dash),
        used / 1024.0,
        total / 1024.0,
        power,
        running,
        waiting,
    );
    if let Some(f) = &state.fleet {
        let price: Vec<String> = f
            .now
            .price_per_hour
            .iter()
            .map(|p| format!("{:.2} {}/h", p.amount, p.currency))
            .collect();
        if !price.is_empty() {
            first.push_str(&format!("   cost {}", price.join(" + ")));
        }
    }
    let second = match &state.error {
        Some(e) => format!("error: {e}"),
        None => "q quit · ↑/↓ select · Enter detail · Esc back".to_string(),
    };
    vec![Line::from(title), Line::from(first), Line::from(second)]
}

const COLUMNS: [&str; 11] = [
    "ID", "STATUS", "MODEL", "GPUS", "UTIL", "VRAM GiB", "TEMP", "POWER", "RUN", "WAIT", "HB AGE",
];

fn instance_cells(r: &InstanceRow, now: DateTime<Utc>) -> Vec<String> {
    let v = &r.view;
    let totals = r.latest.as_ref().and_then(gpu_totals);
    let status = match v.status_reason {
        Some(reason) => format!("{} ({})", v.status, reason.as_str()),
        None => v.status.to_string(),
    };
    let mut cells = vec![v.id.to_string(), status, v.model.clone()];
    match (&r.latest, totals) {
        (Some(s), Some((util, used, total, temp, power))) => cells.extend([
            s.gpus.len().to_string(),
            or_dash(util, |v| format!("{v:.0}%")),
            format!("{:.1}/{:.1}", used / 1024.0, total / 1024.0),
            or_dash(temp, |v| format!("{v:.0}°C")),
            or_dash(power, |v| format!("{v:.0} W")),
        ]),
        _ => cells.extend([dash(), dash(), dash(), dash(), dash()]),
    }
    match &r.latest {
        Some(s) => cells.extend([
            format!("{:.0}", s.engine.requests_running),
            format!("{:.0}", s.engine.requests_waiting),
        ]),
        None => cells.extend([dash(), dash()]),
    }
    cells.push(
        v.last_heartbeat_at
            .map(|t| render::age(t, now))
            .unwrap_or_else(dash),
    );
    cells
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, state: &TopState) {
    let [head, body] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(3)]).areas(frame.area());
    frame.render_widget(Paragraph::new(header_lines(state)), head);
    if state.detail {
        if let Some(row) = state.selected_row() {
            draw_detail(frame, body, row, state.now);
            return;
        }
    }
    let rows: Vec<Row> = state
        .visible()
        .iter()
        .map(|r| Row::new(instance_cells(r, state.now)))
        .collect();
    let widths = [
        Constraint::Length(34),
        Constraint::Length(20),
        Constraint::Min(12),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(11),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(6),
    ];
    let empty = rows.is_empty();
    let table = Table::new(rows, widths)
        .header(Row::new(COLUMNS).style(Style::new().add_modifier(Modifier::BOLD)))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .block(Block::new().borders(Borders::TOP).title(" instances "));
    let mut ts = TableState::default();
    if !empty {
        ts.select(Some(state.selected));
    }
    frame.render_stateful_widget(table, body, &mut ts);
    if empty {
        let [_, msg] = Layout::vertical([Constraint::Length(2), Constraint::Min(1)]).areas(body);
        frame.render_widget(Paragraph::new("no instances"), msg);
    }
}

/// The selected instance: its figures and sparklines of what `top` has seen.
fn draw_detail(frame: &mut Frame, area: Rect, row: &InstanceRow, now: DateTime<Utc>) {
    let v = &row.view;
    let info = vec![
        Line::from(format!(
            "{}   {}   {} / {} / {}   ip {}   heartbeat {}",
            v.id,
            v.status,
            v.provider,
            v.instance_type,
            v.model,
            v.ip.map(|ip| ip.to_string()).unwrap_or_else(dash),
            v.last_heartbeat_at
                .map(|t| format!("{} ago", render::age(t, now)))
                .unwrap_or_else(dash),
        )),
        Line::from(match &row.latest {
            Some(s) => format!(
                "CPU {:.0}%   load {:.2}   memory {:.1}/{:.1} GiB   engine {:?}, {} restarts",
                s.system.cpu_pct,
                s.system.load1,
                s.system.mem_used_bytes as f64 / f64::from(1u32 << 30),
                s.system.mem_total_bytes as f64 / f64::from(1u32 << 30),
                s.engine.status,
                s.engine.restarts
            ),
            None => "no sample yet".to_string(),
        }),
    ];
    let hist = &row.history;
    let series: Vec<(String, Vec<u64>)> = {
        let mut out = vec![];
        let gpus = row.latest.as_ref().map_or(0, |s| s.gpus.len());
        for i in 0..gpus {
            let pick = |f: fn(&gpufleet_proto::GpuSample) -> Option<f64>| -> Vec<u64> {
                hist.iter()
                    .map(|s| {
                        s.gpus
                            .get(i)
                            .and_then(f)
                            .map_or(0, |v| v.max(0.0).round() as u64)
                    })
                    .collect()
            };
            let opt = |v: Option<f64>, unit: &str| {
                v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}{unit}"))
            };
            let last = row.latest.as_ref().and_then(|s| s.gpus.get(i));
            out.push((
                format!(
                    "GPU{i} util {}",
                    last.map(|g| opt(g.util_pct, "%")).unwrap_or_default()
                ),
                pick(|g| g.util_pct),
            ));
            out.push((
                format!(
                    "GPU{i} VRAM {}",
                    last.map(|g| format!("{}/{} MiB", g.mem_used_mib, g.mem_total_mib))
                        .unwrap_or_default()
                ),
                pick(|g| Some(g.mem_used_mib as f64)),
            ));
            out.push((
                format!(
                    "GPU{i} temp {}",
                    last.map(|g| opt(g.temp_c, "°C")).unwrap_or_default()
                ),
                pick(|g| g.temp_c),
            ));
            out.push((
                format!(
                    "GPU{i} power {}",
                    last.map(|g| format!("{}/{}", opt(g.power_w, ""), opt(g.power_limit_w, " W")))
                        .unwrap_or_default()
                ),
                pick(|g| g.power_w),
            ));
        }
        out.push((
            format!(
                "requests running {}",
                row.latest
                    .as_ref()
                    .map(|s| format!("{:.0}", s.engine.requests_running))
                    .unwrap_or_default()
            ),
            hist.iter()
                .map(|s| s.engine.requests_running.max(0.0).round() as u64)
                .collect(),
        ));
        out.push((
            format!(
                "requests waiting {}",
                row.latest
                    .as_ref()
                    .map(|s| format!("{:.0}", s.engine.requests_waiting))
                    .unwrap_or_default()
            ),
            hist.iter()
                .map(|s| s.engine.requests_waiting.max(0.0).round() as u64)
                .collect(),
        ));
        out
    };
    let mut constraints = vec![Constraint::Length(3)];
    constraints.extend(series.iter().map(|_| Constraint::Length(3)));
    constraints.push(Constraint::Min(0));
    let areas = Layout::vertical(constraints).split(area);
    frame.render_widget(
        Paragraph::new(info).block(
            Block::new()
                .borders(Borders::TOP)
                .title(" detail (Esc: back) "),
        ),
        areas[0],
    );
    for (i, (title, data)) in series.iter().enumerate() {
        let area = areas[i + 1];
        // The newest points that fit, right-aligned.
        let width = usize::from(area.width.saturating_sub(2));
        let skip = data.len().saturating_sub(width);
        let spark = Sparkline::default()
            .block(
                Block::new()
                    .borders(Borders::TOP)
                    .title(format!(" {title} ")),
            )
            .data(&data[skip..]);
        frame.render_widget(spark, area);
    }
}

/// Restores the terminal however `top` ends.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen);
    }
}

enum Input {
    Key(KeyCode, KeyModifiers),
    Resize,
}

/// Reads keys on a plain thread (crossterm's reads block).
fn spawn_input() -> tokio::sync::mpsc::Receiver<Input> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    std::thread::spawn(move || loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => {}
            Ok(false) => {
                if tx.is_closed() {
                    return;
                }
                continue;
            }
            Err(_) => return,
        }
        let input = match event::read() {
            Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => Input::Key(k.code, k.modifiers),
            Ok(Event::Resize(..)) => Input::Resize,
            Ok(_) => continue,
            Err(_) => return,
        };
        if tx.blocking_send(input).is_err() {
            return;
        }
    });
    rx
}

/// Re-reads the list, each live instance's newest sample and the fleet totals.
async fn refresh(client: &Client, state: &mut TopState) -> anyhow::Result<()> {
    let path = if state.show_all {
        "/api/v1/instances?include_archived=true"
    } else {
        "/api/v1/instances"
    };
    let list: InstanceList = client.get(path).await?;
    for v in list.instances {
        state.upsert(v);
    }
    let live: Vec<InstanceId> = state
        .visible()
        .iter()
        .filter(|r| !r.view.status.is_terminal())
        .map(|r| r.view.id)
        .collect();
    let fetches = live.iter().map(|id| async move {
        let m: anyhow::Result<InstanceMetrics> = client
            .get(&format!("/api/v1/instances/{id}/metrics?limit=1"))
            .await;
        (*id, m)
    });
    for (id, m) in futures::future::join_all(fetches).await {
        if let Some(latest) = m?.latest {
            state.set_latest(id, latest);
        }
    }
    // Optional: older servers have no fleet endpoint.
    state.fleet = client.get("/api/v1/metrics/fleet").await.ok();
    state.clamp_selection();
    Ok(())
}

pub async fn run(client: &Client, args: TopArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("`gpufleet top` needs a terminal\nhint: for scripts use `gpufleet instances list --json` or `gpufleet instances metrics ID --json`");
    }
    let mut state = TopState {
        server: client.url(""),
        show_all: args.all,
        now: Utc::now(),
        ..TopState::default()
    };
    // Fails early (bad token, server down) before the screen is taken over.
    refresh(client, &mut state).await?;

    terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
    let guard = TerminalGuard;
    execute!(std::io::stdout(), terminal::EnterAlternateScreen)
        .context("cannot open the alternate screen")?;
    let backend = ratatui::backend::CrosstermBackend::new(std::io::stdout());
    let mut term = ratatui::Terminal::new(backend).context("cannot draw on the terminal")?;
    term.clear()?;

    let mut keys = spawn_input();
    let mut stream = open_events(client).await;
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        state.now = Utc::now();
        term.draw(|f| draw(f, &state))?;
        tokio::select! {
            input = keys.recv() => match input {
                Some(Input::Key(code, mods)) => {
                    if !state.key(code, mods) {
                        break;
                    }
                }
                Some(Input::Resize) => {}
                None => break,
            },
            _ = tick.tick() => {
                state.error = refresh(client, &mut state).await.err().map(|e| format!("{e:#}").replace('\n', " "));
                if stream.is_none() {
                    stream = open_events(client).await;
                }
            }
            ev = next_event(&mut stream) => match ev {
                Some(ev) => {
                    for v in super::instances::instances_from_event(&ev.data) {
                        state.upsert(v);
                    }
                    state.clamp_selection();
                }
                None => stream = None,
            },
        }
    }
    drop(term);
    drop(guard);
    Ok(())
}

type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<sse::Event, reqwest::Error>> + Send>>;

async fn open_events(client: &Client) -> Option<EventStream> {
    let resp = client
        .request(Method::GET, "/api/v1/events")
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .ok()?;
    resp.status()
        .is_success()
        .then(|| Box::pin(sse::events(resp)) as EventStream)
}

/// The next event; `None` when the stream ended; never when there is none.
async fn next_event(stream: &mut Option<EventStream>) -> Option<sse::Event> {
    match stream {
        Some(s) => match s.next().await {
            Some(Ok(ev)) => Some(ev),
            _ => None,
        },
        None => futures::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::{EngineSample, EngineStatus, GpuSample, GpuSource, SystemSample};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn view(status: InstanceStatus, minutes_ago: i64) -> InstanceView {
        let now = Utc::now();
        InstanceView {
            id: InstanceId::new(),
            status,
            status_reason: None,
            status_message: None,
            progress: 100,
            provider: "mock".into(),
            zone: "local-1".into(),
            instance_type: "mock-l4-1".into(),
            model: "gpufleet/sim-small".into(),
            ip: None,
            provider_instance_id: None,
            created_at: now - chrono::Duration::minutes(minutes_ago),
            updated_at: now,
            ready_at: None,
            terminated_at: None,
            last_heartbeat_at: Some(now - chrono::Duration::seconds(3)),
            generation: 1,
            deployment_id: None,
            project_id: gpufleet_domain::ProjectId::default_project(),
            price_per_hour: None,
            billing_started_at: None,
            billing_ended_at: None,
            cost_so_far: None,
        }
    }

    fn sample(seq: i64, util: f64) -> SampleView {
        SampleView {
            at: Utc::now(),
            seq,
            system: SystemSample::default(),
            gpu_source: GpuSource::Simulated,
            gpus: vec![GpuSample {
                index: 0,
                name: "NVIDIA L4".into(),
                uuid: None,
                util_pct: Some(util),
                mem_used_mib: 12_288,
                mem_total_mib: 24_576,
                temp_c: Some(61.0),
                power_w: Some(55.0),
                power_limit_w: Some(72.0),
                sm_clock_mhz: Some(1800),
                ecc_uncorrected: Some(0),
                ..GpuSample::default()
            }],
            engine: EngineSample {
                status: EngineStatus::Ready,
                requests_running: 4.0,
                requests_waiting: 2.0,
                restarts: 0,
                kv_cache_usage: None,
                prompt_tokens_per_s: None,
                generation_tokens_per_s: None,
                ttft_mean_s: None,
                canary: None,
            },
        }
    }

    fn screen(state: &TopState, w: u16, h: u16) -> String {
        let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
        term.draw(|f| draw(f, state)).unwrap();
        let buf = term.backend().buffer().clone();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
                    + "\n"
            })
            .collect()
    }

    fn state() -> (TopState, InstanceId, InstanceId) {
        let mut s = TopState {
            server: "http://127.0.0.1:8080".into(),
            now: Utc::now(),
            ..TopState::default()
        };
        let a = view(InstanceStatus::Ready, 10);
        let b = view(InstanceStatus::Starting, 5);
        let gone = view(InstanceStatus::Terminated, 20);
        let (ia, ib) = (a.id, b.id);
        s.upsert(a);
        s.upsert(b);
        s.upsert(gone);
        for (seq, util) in [(1, 10.0), (2, 40.0), (3, 80.0)] {
            s.set_latest(ia, sample(seq, util));
        }
        s.now = Utc::now();
        (s, ia, ib)
    }

    #[test]
    fn the_fleet_table_shows_each_live_instance() {
        let (s, a, b) = state();
        let text = screen(&s, 140, 12);
        assert!(text.contains("instances 2 (ready 1)"), "{text}");
        assert!(text.contains("GPUs 1"), "{text}");
        assert!(text.contains("util 80%"), "{text}");
        assert!(text.contains("requests 4 running / 2 waiting"), "{text}");
        for col in [
            "STATUS", "MODEL", "UTIL", "VRAM GiB", "TEMP", "POWER", "RUN", "WAIT", "HB AGE",
        ] {
            assert!(text.contains(col), "{col}\n{text}");
        }
        let line_a = text
            .lines()
            .find(|l| l.contains(&a.to_string()))
            .expect("row a");
        for cell in [
            "ready",
            "gpufleet/sim-small",
            "80%",
            "12.0/24.0",
            "61°C",
            "55 W",
            " 3s",
        ] {
            assert!(line_a.contains(cell), "{cell} in {line_a:?}");
        }
        let line_b = text
            .lines()
            .find(|l| l.contains(&b.to_string()))
            .expect("row b");
        assert!(line_b.contains("starting"), "{line_b}");
        assert!(!text.contains("terminated"), "hidden unless --all: {text}");
    }

    #[test]
    fn keys_select_and_open_the_detail() {
        let (mut s, a, b) = state();
        assert_eq!(s.selected_row().unwrap().view.id, a, "oldest first");
        assert!(s.key(KeyCode::Down, KeyModifiers::NONE));
        assert_eq!(s.selected_row().unwrap().view.id, b);
        assert!(s.key(KeyCode::Down, KeyModifiers::NONE));
        assert_eq!(s.selected, 1, "stays on the last row");
        assert!(s.key(KeyCode::Up, KeyModifiers::NONE));
        assert!(s.key(KeyCode::Enter, KeyModifiers::NONE));
        assert!(s.detail);
        let text = screen(&s, 120, 40);
        assert!(text.contains("detail"), "{text}");
        assert!(text.contains(&a.to_string()), "{text}");
        assert!(text.contains("GPU0 util 80%"), "{text}");
        assert!(text.contains("GPU0 power 55/72 W"), "{text}");
        assert!(text.contains("requests waiting 2"), "{text}");
        assert!(
            text.chars().any(|c| "▁▂▃▄▅▆▇█".contains(c)),
            "sparklines drawn: {text}"
        );
        assert!(
            s.key(KeyCode::Esc, KeyModifiers::NONE),
            "Esc closes the detail"
        );
        assert!(!s.detail);
        assert!(
            !s.key(KeyCode::Esc, KeyModifiers::NONE),
            "Esc on the list quits"
        );
        assert!(!s.key(KeyCode::Char('q'), KeyModifiers::NONE));
    }

    #[test]
    fn older_generations_and_repeated_samples_are_ignored() {
        let (mut s, a, _) = state();
        let mut newer = s.rows[&a].view.clone();
        newer.generation = 5;
        newer.status = InstanceStatus::Draining;
        s.upsert(newer.clone());
        let mut older = newer.clone();
        older.generation = 4;
        older.status = InstanceStatus::Ready;
        s.upsert(older);
        assert_eq!(s.rows[&a].view.status, InstanceStatus::Draining);
        s.set_latest(a, sample(3, 99.0));
        assert_eq!(s.rows[&a].history.len(), 3, "same seq, one point");
    }

    #[test]
    fn an_empty_fleet_says_so() {
        let s = TopState {
            server: "http://x".into(),
            now: Utc::now(),
            ..TopState::default()
        };
        let text = screen(&s, 100, 8);
        assert!(text.contains("no instances"), "{text}");
        assert!(text.contains("instances 0"), "{text}");
    }
}
