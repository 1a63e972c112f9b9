import { useMemo, useState } from 'preact/hooks'
import { api, ApiError, STARTING, TERMINABLE, type Instance, type InstanceMetrics, type Timeline } from '../api'
import { Chart } from '../components/Chart'
import { Confirm, Loading, Notice, StatusBadge, StatusCell } from '../components/ui'
import { ago, costSoFar, dateTime, duration, money, shortDuration, shortId, time, uptime } from '../format'
import { detailCharts, FALLBACK_LIMIT, freshness, inWindow, seriesCharts, windowBounds, WINDOWS, windowOf, type WindowKey } from '../metrics'
import { allows, roleIn, useSession } from '../session'
import { upsert, useCatalog, useDeploymentNames, useFleet, usePoll, useTick } from '../store'
import { useUsage } from '../usage'

export function Detail({ id }: { id: string }) {
  const fleet = useFleet()
  const catalog = useCatalog()
  const now = useTick(1000)
  const [fetched, setFetched] = useState<Instance | null>(null)
  const [notFound, setNotFound] = useState(false)
  const [timeline, setTimeline] = useState<Timeline | null>(null)
  const [metrics, setMetrics] = useState<InstanceMetrics | null>(null)
  const [win, setWin] = useState<WindowKey>('5m')
  // Where the history API does not answer, recent samples are cut to the window here.
  const [noHistory, setNoHistory] = useState(false)
  const [error, setError] = useState<string | null>(null)
  const [confirm, setConfirm] = useState(false)
  const usage = useUsage()
  const session = useSession()
  const routed = usage.report?.instances.find((u) => u.id === id)

  // The stream keeps the instance current; archived ones leave the stream, so fall back to a GET.
  const live = fleet.instances.get(id)
  const inst = live && (!fetched || live.generation >= fetched.generation) ? live : fetched
  const generation = inst?.generation ?? -1
  const deploymentNames = useDeploymentNames([inst?.deployment_id])
  const terminal = inst?.status === 'terminated' || inst?.status === 'archived'

  usePoll(
    async (signal) => {
      try {
        const i = await api.instance(id, signal)
        setFetched(i)
        setNotFound(false)
      } catch (e) {
        if (e instanceof ApiError && (e.status === 404 || e.status === 400)) setNotFound(true)
      }
    },
    30000,
    [id, live ? 'live' : 'gone'],
  )

  usePoll(
    async (signal) => {
      try {
        const t = await api.timeline(id, signal)
        setTimeline(t)
      } catch (e) {
        if (!signal.aborted) setError(e instanceof ApiError ? e.message : String(e))
      }
    },
    terminal ? 60000 : 4000,
    [id, generation],
  )

  const w = windowOf(win)
  // A terminated instance's window ends when it was terminated; a live one's now.
  const endedAt = inst?.terminated_at ? Date.parse(inst.terminated_at) : null
  usePoll(
    async (signal) => {
      try {
        let m: InstanceMetrics
        if (noHistory) {
          m = await api.metrics(id, FALLBACK_LIMIT, signal)
        } else {
          const { from, to } = windowBounds(w, Math.min(Date.now(), endedAt ?? Infinity))
          m = await api.history(id, from, to, w.stepText, signal)
          if (!m.series) setNoHistory(true)
        }
        setMetrics(m)
      } catch (e) {
        if (!signal.aborted) setError(e instanceof ApiError ? e.message : String(e))
      }
    },
    terminal ? 60000 : w.poll,
    [id, win, terminal, endedAt, noHistory],
  )

  const charts = useMemo(
    () => (!metrics ? [] : metrics.series ? seriesCharts(metrics.series) : detailCharts(inWindow(metrics.samples, w.ms, Date.now()))),
    [metrics, win],
  )
  const hasData = metrics?.series ? metrics.series.samples.some((n) => n > 0) : !!metrics?.samples.length

  if (notFound && !inst) return <Notice tone="bad">No instance {id}. It may have been removed.</Notice>
  if (!inst) return <Loading what="the instance" />

  const type = catalog?.get(`${inst.provider}/${inst.instance_type}`)
  const cost = costSoFar(inst, type, now)
  const mayOperate = allows(roleIn(session, inst.project_id ?? session.project ?? 'default'), 'operate')
  const currency = type?.currency ?? 'EUR'
  const up = uptime(inst, now)
  const fresh = freshness(metrics?.latest?.at ?? inst.last_heartbeat_at, now)

  const terminate = async () => {
    setConfirm(false)
    setError(null)
    try {
      upsert((await api.terminate(id)) as Instance)
    } catch (e) {
      setError(`Could not terminate: ${e instanceof ApiError ? e.message : String(e)}`)
    }
  }
  const archive = async () => {
    setError(null)
    try {
      const v = (await api.archive(id)) as Instance
      setFetched(v)
      upsert(v)
    } catch (e) {
      setError(`Could not archive: ${e instanceof ApiError ? e.message : String(e)}`)
    }
  }

  return (
    <section aria-labelledby="detail-title">
      <p class="crumbs">
        <a href="#/instances">Instances</a> / <span class="mono">{id}</span>
      </p>
      <div class="page-head">
        <h1 id="detail-title">
          {inst.model} <span class="muted">on</span> {inst.instance_type}
        </h1>
        <div class="head-actions">
          {TERMINABLE.includes(inst.status) && mayOperate && (
            <button type="button" class="btn btn-danger" onClick={() => setConfirm(true)}>
              Terminate
            </button>
          )}
          {inst.status === 'terminated' && mayOperate && (
            <button type="button" class="btn" onClick={archive}>
              Archive
            </button>
          )}
        </div>
      </div>
      {error && <Notice tone="bad">{error}</Notice>}
      {inst.status === 'archived' && <Notice>This instance is archived: it is kept for its history only.</Notice>}

      <div class="card summary-card">
        <dl class="summary-grid">
          <div>
            <dt>Status</dt>
            <dd data-testid="detail-status">
              <StatusCell i={inst} />
            </dd>
          </div>
          <div>
            <dt>Heartbeat</dt>
            <dd>
              <span class={`badge badge-${fresh.tone}`}>{fresh.label}</span>{' '}
              <span class="muted small">{ago(metrics?.latest?.at ?? inst.last_heartbeat_at, now)}</span>
            </dd>
          </div>
          <div>
            <dt>GPUs</dt>
            <dd data-testid="detail-gpus">
              {!metrics?.latest ? (
                '—'
              ) : (
                <>
                  {metrics.latest.gpus.length}{' '}
                  {metrics.latest.gpu_source === 'simulated' ? (
                    <span class="badge badge-warn" title="No NVIDIA driver was used: these GPU figures are simulated">
                      simulated
                    </span>
                  ) : (
                    <span class="badge badge-info">NVML</span>
                  )}{' '}
                  {metrics.latest.gpus.map((g) => (
                    <span class="muted small mono" key={g.index}>
                      {' '}
                      GPU{g.index} {g.util_pct === null ? '—' : `${g.util_pct.toFixed(0)}%`} · {g.temp_c === null ? '—' : `${g.temp_c.toFixed(0)} °C`} ·{' '}
                      {g.power_w === null ? '—' : `${g.power_w.toFixed(0)} W`}
                    </span>
                  ))}
                </>
              )}
            </dd>
          </div>
          <div>
            <dt>Engine canary</dt>
            <dd data-testid="detail-canary">
              {!metrics?.latest?.engine.canary ? (
                <span class="muted">—</span>
              ) : metrics.latest.engine.canary.ok ? (
                <>
                  <span class="badge badge-ok">answers</span>{' '}
                  <span class="muted small">
                    {metrics.latest.engine.canary.latency_ms === undefined ? '' : `${metrics.latest.engine.canary.latency_ms.toFixed(0)} ms · `}
                    {ago(metrics.latest.engine.canary.checked_at, now)}
                  </span>
                </>
              ) : (
                <>
                  <span class="badge badge-bad">failing</span>{' '}
                  <span class="small">{metrics.latest.engine.canary.error ?? 'no reason given'}</span>{' '}
                  <span class="muted small">
                    ({metrics.latest.engine.canary.consecutive_failures}× · {ago(metrics.latest.engine.canary.checked_at, now)})
                  </span>
                </>
              )}
            </dd>
          </div>
          {inst.deployment_id && (
            <div>
              <dt>Deployment</dt>
              <dd data-testid="detail-deployment">
                <a href={`#/deployments/${inst.deployment_id}`} title={inst.deployment_id}>
                  {deploymentNames.get(inst.deployment_id) ?? shortId(inst.deployment_id)}
                </a>
                <span class="muted small"> · a replica: the deployment replaces or removes it as needed</span>
              </dd>
            </div>
          )}
          <div>
            <dt>Provider / zone</dt>
            <dd>
              {inst.provider} / {inst.zone}
            </dd>
          </div>
          <div>
            <dt>Type</dt>
            <dd>
              {inst.instance_type}
              {type && (
                <span class="muted small">
                  {' '}
                  · {type.gpu.count}× {type.gpu.model} · {money(type.price_per_hour, type.currency)}/h
                </span>
              )}
            </dd>
          </div>
          <div>
            <dt>IP</dt>
            <dd class="mono">{inst.ip ?? '—'}</dd>
          </div>
          <div>
            <dt>Provider id</dt>
            <dd class="mono small">{inst.provider_instance_id ?? '—'}</dd>
          </div>
          <div>
            <dt>Created</dt>
            <dd>{dateTime(inst.created_at)}</dd>
          </div>
          <div>
            <dt>Ready</dt>
            <dd>
              {dateTime(inst.ready_at)}
              {inst.ready_at && (
                <span class="muted small"> · after {duration(Date.parse(inst.ready_at) - Date.parse(inst.created_at))}</span>
              )}
            </dd>
          </div>
          <div>
            <dt>Uptime</dt>
            <dd>{up === null ? '—' : duration(up)}</dd>
          </div>
          {inst.project_id && (
            <div>
              <dt>Project</dt>
              <dd data-testid="detail-project">{inst.project_id}</dd>
            </div>
          )}
          {typeof inst.price_per_hour === 'number' && (
            <div>
              <dt>Price per hour</dt>
              <dd data-testid="detail-price">
                {money(inst.price_per_hour, currency)}/h
                <span class="muted small"> · when created</span>
              </dd>
            </div>
          )}
          <div>
            <dt>Cost so far</dt>
            <dd data-testid="detail-cost">
              {cost === null ? '—' : money(cost, currency)}
              {typeof inst.price_per_hour === 'number' ? (
                <span class="muted small">{inst.billing_started_at ? ` · billed since ${dateTime(inst.billing_started_at)}${inst.billing_ended_at ? ` until ${dateTime(inst.billing_ended_at)}` : ''}` : ' · not billed yet'}</span>
              ) : (
                cost !== null && <span class="muted small"> · estimate from the catalog price</span>
              )}
            </dd>
          </div>
          {inst.terminated_at && (
            <div>
              <dt>Terminated</dt>
              <dd>{dateTime(inst.terminated_at)}</dd>
            </div>
          )}
        </dl>
        {inst.status_message && (
          <p class={inst.status === 'failed' ? 'status-message bad' : 'status-message'}>
            {inst.status_reason && <strong>{inst.status_reason.replace(/_/g, ' ')}: </strong>}
            {inst.status_message}
          </p>
        )}
      </div>

      <h2 id="routing-title">Routing</h2>
      {!routed ? (
        <p class="muted" data-testid="routing">
          {usage.available === false ? 'The router reports no figures here.' : 'No request has been routed to this instance yet.'}
        </p>
      ) : (
        <dl class="summary-grid" aria-labelledby="routing-title" data-testid="routing">
          <div>
            <dt>Requests</dt>
            <dd>
              {routed.requests.toLocaleString()}
              <span class="muted small"> · {routed.errors.toLocaleString()} failed</span>
            </dd>
          </div>
          <div>
            <dt title="Requests with no first token within the instance's stall bound, retried on another instance">Stalls</dt>
            <dd data-routing="stalls">{routed.stalls.toLocaleString()}</dd>
          </div>
          <div>
            <dt title="Times the circuit opened: the instance left the router's choice until a probe passed">Ejections</dt>
            <dd data-routing="ejections">{routed.ejections.toLocaleString()}</dd>
          </div>
          <div>
            <dt title="Hedged copies of slow requests sent to this instance">Hedges</dt>
            <dd data-routing="hedges">{routed.hedges.toLocaleString()}</dd>
          </div>
          <div>
            <dt title="Streams that broke off here and were continued on another instance">Failovers</dt>
            <dd data-routing="failovers">{routed.failovers.toLocaleString()}</dd>
          </div>
        </dl>
      )}

      <div class="section-head">
        <h2 id="charts-title">Metrics</h2>
        <div class="segmented" role="radiogroup" aria-label="Window">
          {WINDOWS.map((x) => (
            <button type="button" role="radio" aria-checked={win === x.key} class={win === x.key ? 'seg on' : 'seg'} onClick={() => setWin(x.key as WindowKey)}>
              {x.label}
            </button>
          ))}
        </div>
      </div>
      {metrics?.series && (
        <p class="muted small chart-note" data-testid="chart-note">
          {seriesNote(metrics.series.step, metrics.series.tier)}
          {terminal ? ` Up to ${time(metrics.series.to)}.` : ` Updated every ${w.poll / 1000} s.`}
        </p>
      )}
      {!metrics ? (
        <Loading what="metrics" />
      ) : !hasData && !metrics.latest ? (
        <p class="muted">{STARTING.includes(inst.status) ? 'Metrics appear once the agent sends its first heartbeat.' : 'No samples recorded.'}</p>
      ) : (
        <div class="chart-grid" aria-labelledby="charts-title">
          {charts.map((c) => (
            <Chart key={c.id} title={c.title} series={c.labels.map((label) => ({ label }))} data={c.data} fmt={c.fmt} yRange={c.yRange} step={c.step} />
          ))}
        </div>
      )}

      <h2 id="timeline-title">Timeline</h2>
      {!timeline ? <Loading what="the timeline" /> : <TimelineView t={timeline} />}

      <Confirm open={confirm} title="Terminate this instance?" confirmLabel="Terminate" onCancel={() => setConfirm(false)} onConfirm={terminate}>
        <p>
          <code>{id}</code> will be deleted at the provider. This cannot be undone.
        </p>
      </Confirm>
    </section>
  )
}

/** What one point of the charts is, in words. */
function seriesNote(step: string, tier: string): string {
  const width = step.replace(/^(\d+)([smhd])$/, (_m, n, u) => `${n} ${u === 's' ? 's' : u === 'm' ? 'min' : u === 'h' ? 'h' : 'd'}`)
  const source = tier === 'minute' ? ' from 1-minute rollups (the current minute appears once it is rolled up)' : tier === 'hour' ? ' from 1-hour rollups (the current hour appears once it is rolled up)' : ''
  return `Averages over ${width} buckets${source}.`
}

function TimelineView({ t }: { t: Timeline }) {
  if (!t.events.length) return <p class="muted">No events yet.</p>
  const start = Date.parse(t.events[0].at)
  return (
    <ol class="timeline" aria-labelledby="timeline-title">
      {t.events.map((e) => (
        <li class={`tl tl-${e.outcome}`} data-outcome={e.outcome}>
          <span class="tl-dot" aria-hidden="true" />
          <div class="tl-main">
            <div class="tl-head">
              <span class="tl-action">{e.action}</span>
              {e.from_status && e.to_status && (
                <span class="tl-trans">
                  <StatusBadge status={e.from_status} /> → <StatusBadge status={e.to_status} />
                </span>
              )}
              <span class={`tl-outcome o-${e.outcome}`}>{e.outcome.replace(/_/g, ' ')}</span>
              {e.duration_ms !== null && <span class="tl-dur">took {shortDuration(e.duration_ms)}</span>}
            </div>
            {e.message && <p class="tl-msg">{e.message}</p>}
            {e.error_code && (
              <p class="tl-err">
                Error <code>{e.error_code}</code>
              </p>
            )}
          </div>
          <time class="tl-time" dateTime={e.at} title={dateTime(e.at)}>
            {time(e.at)} <span class="muted">+{shortDuration(Date.parse(e.at) - start)}</span>
          </time>
        </li>
      ))}
    </ol>
  )
}
