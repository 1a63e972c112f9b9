import { useState } from 'preact/hooks'
import { ALIVE, ALL_STATUSES, api, type Sample } from '../api'
import { Empty, Loading, Notice, Stat, StatusBadge } from '../components/ui'
import { mib, money, pct } from '../format'
import { useCatalog, useFleet, usePoll, useTick } from '../store'

const SERVING = ['ready', 'unhealthy', 'starting']

/** Fleet totals, computed here from instances and their latest samples (fleet metrics land later). */
export function Overview() {
  const fleet = useFleet()
  const catalog = useCatalog()
  const now = useTick(5000)
  const [latest, setLatest] = useState<Map<string, Sample> | null>(null)
  const all = [...fleet.instances.values()]
  const serving = all.filter((i) => SERVING.includes(i.status)).map((i) => i.id)

  usePoll(
    async (signal) => {
      const m = new Map<string, Sample>()
      await Promise.all(
        serving.map(async (id) => {
          try {
            const r = await api.metrics(id, 1, signal)
            if (r.latest) m.set(id, r.latest)
          } catch {
            // an instance that just went away
          }
        }),
      )
      if (!signal.aborted) setLatest(m)
    },
    5000,
    [serving.join(',')],
  )

  if (!fleet.loaded) return fleet.error ? <Notice tone="bad">{fleet.error.message} Retrying…</Notice> : <Loading what="the fleet" />

  const byStatus = new Map<string, number>()
  for (const i of all) byStatus.set(i.status, (byStatus.get(i.status) ?? 0) + 1)
  const alive = all.filter((i) => ALIVE.includes(i.status))

  let gpus = 0
  let pricePerHour = 0
  let currency = ''
  for (const i of alive) {
    const t = catalog?.get(`${i.provider}/${i.instance_type}`)
    if (!t) continue
    gpus += t.gpu.count
    pricePerHour += t.price_per_hour
    currency ||= t.currency
  }
  const samples = serving.map((id) => latest?.get(id)).filter((s): s is Sample => !!s && now - Date.parse(s.at) < 120_000)
  const gs = samples.flatMap((s) => s.gpus)
  const meanUtil = gs.length ? gs.reduce((a, g) => a + g.util_pct, 0) / gs.length : null
  const vramUsed = gs.reduce((a, g) => a + g.mem_used_mib, 0)
  const vramTotal = gs.reduce((a, g) => a + g.mem_total_mib, 0)
  const power = gs.reduce((a, g) => a + g.power_w, 0)
  const powerLimit = gs.reduce((a, g) => a + g.power_limit_w, 0)
  const running = samples.reduce((a, s) => a + s.engine.requests_running, 0)
  const waiting = samples.reduce((a, s) => a + s.engine.requests_waiting, 0)

  return (
    <section aria-labelledby="overview-title">
      <div class="page-head">
        <h1 id="overview-title">Fleet overview</h1>
        <a class="btn btn-primary" href="#/instances/new">
          Create instances
        </a>
      </div>
      {all.length === 0 ? (
        <Empty title="No instances yet.">
          <p>
            The fleet is empty. <a href="#/instances/new">Create instances</a> to serve a model.
          </p>
        </Empty>
      ) : (
        <>
          <div class="stats">
            <Stat label="Instances" value={all.length} sub={`${byStatus.get('ready') ?? 0} ready`} />
            <Stat label="GPUs in use" value={catalog ? gpus : '…'} sub={`${alive.length} machines`} />
            <Stat label="Mean GPU utilisation" value={meanUtil === null ? (latest ? '—' : '…') : pct(meanUtil)} sub={latest ? `${gs.length} GPUs reporting` : 'reading heartbeats…'} />
            <Stat label="VRAM used" value={vramTotal ? mib(vramUsed) : '—'} sub={vramTotal ? `of ${mib(vramTotal)} (${pct((100 * vramUsed) / vramTotal)})` : 'no samples'} />
            <Stat label="GPU power" value={gs.length ? `${power.toFixed(0)} W` : '—'} sub={powerLimit ? `limit ${powerLimit.toFixed(0)} W` : undefined} />
            <Stat label="Price per hour" value={catalog && currency ? money(pricePerHour, currency) : '—'} sub="instances not yet terminated" />
            <Stat label="Requests" value={samples.length ? running.toFixed(0) : '—'} sub={samples.length ? `running, ${waiting.toFixed(0)} waiting` : undefined} />
          </div>
          <h2>By status</h2>
          <ul class="status-list">
            {ALL_STATUSES.filter((s) => byStatus.get(s)).map((s) => (
              <li>
                <StatusBadge status={s} /> <strong>{byStatus.get(s)}</strong>
              </li>
            ))}
          </ul>
          <p class="muted small">
            Totals are computed in the browser from the live instance list and each instance's latest heartbeat.
          </p>
        </>
      )}
    </section>
  )
}
