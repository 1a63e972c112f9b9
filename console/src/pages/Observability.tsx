import { useMemo, useState } from 'preact/hooks'
import { api, type Instance, type InstanceMetrics } from '../api'
import { Chart } from '../components/Chart'
import { Empty, Loading, Notice, StatusBadge } from '../components/ui'
import { ago, shortId } from '../format'
import { FALLBACK_LIMIT, freshness, inWindow, sparkCharts, sparkSeriesCharts, windowBounds, WINDOWS, windowOf, type WindowKey } from '../metrics'
import { useFleet, usePoll, useTick } from '../store'

const WATCHED = ['starting', 'ready', 'unhealthy', 'draining']

export function Observability() {
  const fleet = useFleet()
  const [win, setWin] = useState<WindowKey>('5m')
  const list = [...fleet.instances.values()].filter((i) => WATCHED.includes(i.status)).sort((a, b) => a.created_at.localeCompare(b.created_at))

  if (!fleet.loaded) return fleet.error ? <Notice tone="bad">{fleet.error.message} Retrying…</Notice> : <Loading what="the fleet" />

  return (
    <section aria-labelledby="obs-title">
      <div class="page-head">
        <h1 id="obs-title">Observability</h1>
        <div class="segmented" role="radiogroup" aria-label="Window">
          {WINDOWS.filter((w) => w.key !== '7d').map((x) => (
            <button type="button" role="radio" aria-checked={win === x.key} class={win === x.key ? 'seg on' : 'seg'} onClick={() => setWin(x.key as WindowKey)}>
              {x.label}
            </button>
          ))}
        </div>
      </div>
      {list.length === 0 ? (
        <Empty title="No running instances.">
          <p>Instances appear here once they start sending heartbeats.</p>
        </Empty>
      ) : (
        <div class="obs-list">
          {list.map((i) => (
            <ObsCard key={i.id} i={i} win={win} />
          ))}
        </div>
      )}
    </section>
  )
}

function ObsCard({ i, win }: { i: Instance; win: WindowKey }) {
  const now = useTick(2000)
  const w = windowOf(win)
  const [metrics, setMetrics] = useState<InstanceMetrics | null>(null)
  // Where the history API does not answer, recent samples are cut to the window here.
  const [noHistory, setNoHistory] = useState(false)
  usePoll(
    async (signal) => {
      let m: InstanceMetrics
      if (noHistory) {
        m = await api.metrics(i.id, FALLBACK_LIMIT, signal)
      } else {
        const { from, to } = windowBounds(w, Date.now())
        m = await api.history(i.id, from, to, w.stepText, signal)
        if (!m.series) setNoHistory(true)
      }
      if (!signal.aborted) setMetrics(m)
    },
    Math.max(w.poll, 3000),
    [i.id, win, noHistory],
  )
  const charts = useMemo(
    () => (!metrics ? [] : metrics.series ? sparkSeriesCharts(metrics.series) : sparkCharts(inWindow(metrics.samples, w.ms, Date.now()))),
    [metrics, win],
  )
  const latest = metrics?.latest
  const fresh = freshness(latest?.at ?? i.last_heartbeat_at, now)
  const last = (c: (typeof charts)[number]) => {
    const col = c.data[1]
    for (let k = col.length - 1; k >= 0; k--) if (col[k] !== null) return c.fmt(col[k] as number)
    return '—'
  }

  return (
    <article class="card obs-card" aria-labelledby={`obs-${i.id}`}>
      <header class="obs-head">
        <h2 id={`obs-${i.id}`}>
          <a href={`#/instances/${i.id}`} class="mono">
            {shortId(i.id)}
          </a>{' '}
          <span class="muted small">
            {i.model} · {i.instance_type} · {i.ip ?? 'no IP'}
          </span>
        </h2>
        <StatusBadge status={i.status} />
        <span class={`badge badge-${fresh.tone}`} title={`Last heartbeat ${ago(latest?.at ?? i.last_heartbeat_at, now)}`}>
          ♥ {fresh.label} · {ago(latest?.at ?? i.last_heartbeat_at, now)}
        </span>
      </header>
      {!metrics ? (
        <Loading what="samples" />
      ) : (
        <div class="spark-grid">
          {charts.map((c) => (
            <div class="spark-cell">
              <div class="spark-label">
                <span>{c.title}</span> <strong>{last(c)}</strong>
              </div>
              <Chart spark title={`${c.title} of ${i.id}`} series={[{ label: c.title }]} data={c.data} fmt={c.fmt} yRange={c.yRange} step={c.step} />
            </div>
          ))}
        </div>
      )}
    </article>
  )
}
