import { useMemo, useState } from 'preact/hooks'
import { ALIVE, ALL_STATUSES, api, ApiError, type FleetMetrics, type Sample } from '../api'
import { Chart } from '../components/Chart'
import { Empty, Loading, Notice, Stat, StatusBadge } from '../components/ui'
import { mib, money, pct, perSec } from '../format'
import { canHere, useSession } from '../session'
import { useCatalog, useFleet, usePoll, useTick } from '../store'
import { sumRates, useUsage } from '../usage'

const SERVING = ['ready', 'unhealthy', 'starting']

/**
 * Fleet totals from `GET /api/v1/metrics/fleet`; where that does not answer,
 * computed here from the live instance list, the catalog and each serving
 * instance's latest heartbeat.
 */
export function Overview() {
  const fleet = useFleet()
  const mayCreate = canHere(useSession(), 'operate')
  const catalog = useCatalog()
  const now = useTick(5000)
  const usage = useUsage()
  const [latest, setLatest] = useState<Map<string, Sample> | null>(null)
  // null: not asked yet; false: the endpoint does not answer (the fallback computes the totals).
  const [fm, setFm] = useState<FleetMetrics | false | null>(null)
  const all = [...fleet.instances.values()]
  const serving = all.filter((i) => SERVING.includes(i.status)).map((i) => i.id)

  usePoll(
    async (signal) => {
      try {
        setFm(await api.fleetMetrics('1h', signal))
      } catch (e) {
        if (signal.aborted) return
        // Unauthorised signs out; anything else: compute in the browser.
        if (!(e instanceof ApiError && e.status === 401)) setFm(false)
      }
    },
    5000,
    [],
  )

  usePoll(
    async (signal) => {
      if (fm !== false) return
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
    [serving.join(','), fm === false],
  )
  const fleetCharts = useMemo(() => {
    if (!fm) return null
    const x = fm.series.timestamps.map((t) => Date.parse(t) / 1000)
    return { step: x.length > 1 ? x[1] - x[0] : undefined, util: [x, fm.series.mean_gpu_util_pct], power: [x, fm.series.power_w] }
  }, [fm])

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
  // From the fleet endpoint when it answers, else from the latest samples.
  const n = fm ? fm.now : null
  const reading = fm === null || (fm === false && !latest)
  const gpusReporting = n ? n.gpus : gs.length
  // Over the GPUs that report a figure: an unknown (MIG, GPU lost) is not 0.
  const utils = gs.map((g) => g.util_pct).filter((v): v is number => v !== null)
  const meanUtil = n ? n.mean_gpu_util_pct : utils.length ? utils.reduce((a, u) => a + u, 0) / utils.length : null
  const vramUsed = n ? n.vram_used_mib : gs.reduce((a, g) => a + g.mem_used_mib, 0)
  const vramTotal = n ? n.vram_total_mib : gs.reduce((a, g) => a + g.mem_total_mib, 0)
  const power = n ? n.power_w : gs.reduce((a, g) => a + (g.power_w ?? 0), 0)
  const powerLimit = n ? n.power_limit_w : gs.reduce((a, g) => a + (g.power_limit_w ?? 0), 0)
  const running = samples.reduce((a, s) => a + s.engine.requests_running, 0)
  const waiting = samples.reduce((a, s) => a + s.engine.requests_waiting, 0)
  const prices = n ? n.price_per_hour.filter((p) => p.amount > 0 || n.price_per_hour.length === 1) : null
  const price = prices
    ? prices.length
      ? prices.map((p) => money(p.amount, p.currency)).join(' + ')
      : money(0, currency || 'EUR')
    : catalog && currency
      ? money(pricePerHour, currency)
      : '—'
  const priceSub = n ? `${n.billable_instances} billable instance${n.billable_instances === 1 ? '' : 's'}` : 'instances not yet terminated'
  const routerRates = usage.report && usage.spanMs > 0 ? sumRates(usage.report.keys.map((k) => usage.rates.get('key:' + k.id))) : null
  const statusFigures = new Map((n?.by_status ?? []).map((s) => [s.status, s]))

  return (
    <section aria-labelledby="overview-title">
      <div class="page-head">
        <h1 id="overview-title">Fleet overview</h1>
        {mayCreate && (
          <a class="btn btn-primary" href="#/instances/new">
            Create instances
          </a>
        )}
      </div>
      {all.length === 0 ? (
        <Empty title="No instances yet.">
          {mayCreate ? (
            <p>
              The fleet is empty. <a href="#/instances/new">Create instances</a> to serve a model.
            </p>
          ) : (
            <p>The fleet is empty.</p>
          )}
        </Empty>
      ) : (
        <>
          <div class="stats">
            <Stat label="Instances" value={all.length} sub={`${byStatus.get('ready') ?? 0} ready`} />
            <Stat label="GPUs in use" value={catalog ? gpus : '…'} sub={`${alive.length} machines`} />
            <Stat label="Mean GPU utilisation" value={meanUtil === null ? (reading ? '…' : '—') : pct(meanUtil)} sub={reading ? 'reading heartbeats…' : `${gpusReporting} GPUs reporting`} />
            <Stat label="VRAM used" value={vramTotal ? mib(vramUsed) : '—'} sub={vramTotal ? `of ${mib(vramTotal)} (${pct((100 * vramUsed) / vramTotal)})` : 'no samples'} />
            <Stat label="GPU power" value={gpusReporting ? `${power.toFixed(0)} W` : '—'} sub={powerLimit ? `limit ${powerLimit.toFixed(0)} W` : undefined} />
            <Stat label="Price per hour" value={price} sub={priceSub} />
            {fm === false ? (
              <Stat label="Requests" value={samples.length ? running.toFixed(0) : '—'} sub={samples.length ? `running, ${waiting.toFixed(0)} waiting` : undefined} />
            ) : (
              <Stat
                label="Router requests/s"
                value={routerRates ? perSec(routerRates.requests) : usage.available === false ? '—' : '…'}
                sub={routerRates ? `${perSec(routerRates.completion_tokens)} completion tokens/s` : usage.available === false ? 'not reported' : 'measuring…'}
              />
            )}
          </div>
          {fm && fleetCharts && (
            <div class="chart-grid fleet-charts" aria-label="The fleet over the last hour">
              <Chart title="Mean GPU utilisation, last hour" series={[{ label: 'Mean' }]} data={fleetCharts.util} fmt={pct} yRange={[0, 100]} step={fleetCharts.step} height={140} />
              <Chart title="GPU power, last hour" series={[{ label: 'Power' }]} data={fleetCharts.power} fmt={(v) => `${v.toFixed(0)} W`} step={fleetCharts.step} height={140} />
            </div>
          )}
          <h2>By status</h2>
          <ul class="status-list">
            {ALL_STATUSES.filter((s) => byStatus.get(s)).map((s) => (
              <li>
                <StatusBadge status={s} /> <strong>{byStatus.get(s)}</strong>
                {!!statusFigures.get(s)?.gpus && (
                  <span class="muted small">
                    {' '}
                    · {statusFigures.get(s)!.gpus} GPUs
                    {statusFigures.get(s)!.mean_gpu_util_pct !== null && ` at ${pct(statusFigures.get(s)!.mean_gpu_util_pct!)}`}
                  </span>
                )}
              </li>
            ))}
          </ul>
          <p class="muted small" data-testid="overview-source">
            {fm
              ? 'GPU figures are from instances with a fresh heartbeat; the price is what the instances being paid for cost, from the providers’ catalogs.'
              : 'Totals are computed in the browser from the live instance list and each instance’s latest heartbeat.'}
          </p>
        </>
      )}
    </section>
  )
}
