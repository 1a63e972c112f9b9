import { useMemo, useState } from 'preact/hooks'
import { api, ApiError, type SpendGroupBy, type SpendReport, type SpendStep } from '../api'
import { Chart } from '../components/Chart'
import { Empty, errorText, Loading, Notice } from '../components/ui'
import { money, num } from '../format'
import { useSession } from '../session'
import { usePoll } from '../store'

type Range = '24h' | '7d' | '30d' | 'custom'

const RANGES: { key: Range; label: string; ms: number; step: SpendStep }[] = [
  { key: '24h', label: 'Last 24 h', ms: 24 * 3600_000, step: '1h' },
  { key: '7d', label: 'Last 7 d', ms: 7 * 24 * 3600_000, step: '1d' },
  { key: '30d', label: 'Last 30 d', ms: 30 * 24 * 3600_000, step: '1d' },
  { key: 'custom', label: 'Custom', ms: 0, step: '1d' },
]

const GROUPS: { key: SpendGroupBy; label: string }[] = [
  { key: 'project', label: 'Project' },
  { key: 'deployment', label: 'Deployment' },
  { key: 'model', label: 'Model' },
  { key: 'provider', label: 'Provider' },
]

/** `datetime-local` value for a time. */
function localInput(t: number): string {
  const d = new Date(t - new Date(t).getTimezoneOffset() * 60_000)
  return d.toISOString().slice(0, 16)
}

/** The [from, to) of a range: whole steps, ending at the next step boundary after now. */
function bounds(range: Range, step: SpendStep, customFrom: string, customTo: string, now: number): { from: number; to: number } | null {
  if (range === 'custom') {
    const from = Date.parse(customFrom)
    const to = Date.parse(customTo)
    return Number.isFinite(from) && Number.isFinite(to) && from < to ? { from, to } : null
  }
  const unit = step === '1h' ? 3600_000 : 24 * 3600_000
  const to = Math.ceil(now / unit) * unit
  return { from: to - RANGES.find((r) => r.key === range)!.ms, to }
}

export function Spend() {
  const s = useSession()
  const [range, setRange] = useState<Range>('24h')
  const [step, setStep] = useState<SpendStep>('1h')
  const [groupBy, setGroupBy] = useState<SpendGroupBy>('project')
  const [customFrom, setCustomFrom] = useState(() => localInput(Date.now() - 7 * 24 * 3600_000))
  const [customTo, setCustomTo] = useState(() => localInput(Date.now()))
  const [report, setReport] = useState<SpendReport | null>(null)
  const [missing, setMissing] = useState(false)
  const [error, setError] = useState<string | null>(null)

  const chooseRange = (r: Range) => {
    setRange(r)
    if (r !== 'custom') setStep(RANGES.find((x) => x.key === r)!.step)
  }

  usePoll(
    async (signal) => {
      const b = bounds(range, step, customFrom, customTo, Date.now())
      if (!b) {
        setError('Choose a custom range whose start is before its end.')
        return
      }
      try {
        const r = await api.spend({ ...b, groupBy, step, project: s.project }, signal)
        setReport(r)
        setMissing(false)
        setError(null)
      } catch (e) {
        if (signal.aborted) return
        if (e instanceof ApiError && e.status === 404) {
          setMissing(true)
          setReport(null)
        } else setError(errorText(e))
      }
    },
    60000,
    [range, step, groupBy, customFrom, customTo, s.project],
  )

  const chart = useMemo(() => {
    if (!report || report.groups.length === 0) return null
    const xs = [...new Set(report.groups.flatMap((g) => g.series.timestamps))].sort()
    const at = new Map(xs.map((x, i) => [x, i]))
    const cols = report.groups.map((g) => {
      const col: (number | null)[] = xs.map(() => null)
      g.series.timestamps.forEach((t, i) => (col[at.get(t)!] = g.series.cost[i]))
      return col
    })
    return { data: [xs.map((x) => Date.parse(x) / 1000), ...cols], series: report.groups.map((g) => ({ label: g.key || '(none)' })) }
  }, [report])

  const currency = report?.currency ?? 'EUR'
  const cpm = (v: number | null) => (v === null ? <span class="muted">—</span> : money(v, currency))
  const empty = report && report.groups.length === 0 && report.total.cost === 0 && report.total.prompt_tokens + report.total.completion_tokens === 0

  return (
    <section aria-labelledby="spend-title">
      <div class="page-head">
        <h1 id="spend-title">Spend</h1>
      </div>
      <p class="muted">
        What the machines cost while the provider billed them, and the tokens they served.{s.project ? ` Project ${s.project}.` : ' All your projects.'}
      </p>
      <div class="toolbar" role="group" aria-label="Spend options">
        <div class="segmented" role="radiogroup" aria-label="Range">
          {RANGES.map((r) => (
            <button type="button" role="radio" aria-checked={range === r.key} class={range === r.key ? 'seg on' : 'seg'} onClick={() => chooseRange(r.key)}>
              {r.label}
            </button>
          ))}
        </div>
        {range === 'custom' && (
          <>
            <label class="inline">
              From
              <input type="datetime-local" value={customFrom} onInput={(e) => setCustomFrom(e.currentTarget.value)} />
            </label>
            <label class="inline">
              To
              <input type="datetime-local" value={customTo} onInput={(e) => setCustomTo(e.currentTarget.value)} />
            </label>
          </>
        )}
        <label class="inline">
          Group by
          <select value={groupBy} onChange={(e) => setGroupBy(e.currentTarget.value as SpendGroupBy)}>
            {GROUPS.map((g) => (
              <option value={g.key}>{g.label}</option>
            ))}
          </select>
        </label>
        <label class="inline">
          Step
          <select value={step} onChange={(e) => setStep(e.currentTarget.value as SpendStep)}>
            <option value="1h">1 hour</option>
            <option value="1d">1 day</option>
          </select>
        </label>
      </div>
      {error && <Notice tone="bad">{error}</Notice>}
      {missing ? (
        <Empty title="Spend reporting is not available on this control plane.">
          <p>It answers 404 for GET /api/v1/spend: it predates spend reporting.</p>
        </Empty>
      ) : !report ? (
        error ? null : <Loading what="spend" />
      ) : (
        <>
          <div class="stats" data-testid="spend-total">
            <div class="stat">
              <div class="stat-label">Total cost</div>
              <div class="stat-value">{money(report.total.cost, currency)}</div>
            </div>
            <div class="stat">
              <div class="stat-label">GPU hours</div>
              <div class="stat-value">{report.total.gpu_hours.toFixed(2)}</div>
              {report.total.instance_hours !== undefined && <div class="stat-sub">{report.total.instance_hours.toFixed(2)} instance hours</div>}
            </div>
            <div class="stat">
              <div class="stat-label">Tokens</div>
              <div class="stat-value">{num(report.total.prompt_tokens + report.total.completion_tokens)}</div>
              <div class="stat-sub">
                {num(report.total.prompt_tokens)} prompt · {num(report.total.completion_tokens)} completion
              </div>
            </div>
            <div class="stat">
              <div class="stat-label">Cost per million tokens</div>
              <div class="stat-value">{cpm(report.total.cost_per_million_tokens)}</div>
            </div>
          </div>
          {!!report.unpriced_instances && (
            <Notice tone="warn">
              {report.unpriced_instances} billable instance{report.unpriced_instances === 1 ? ' has' : 's have'} no known price (created before prices were kept): counted as 0.
            </Notice>
          )}
          {!!report.gpu_count_unknown_instances && (
            <Notice tone="warn">
              {report.gpu_count_unknown_instances} instance{report.gpu_count_unknown_instances === 1 ? '' : 's'} of a type whose GPU count is unknown: left out of GPU hours.
            </Notice>
          )}
          {empty ? (
            <Empty title="Nothing was spent in this range.">
              <p>No machine was billed and no token was served{s.project ? ` in project ${s.project}` : ''} between these times.</p>
            </Empty>
          ) : (
            <>
              {chart && (
                <div class="fleet-charts" data-testid="spend-chart">
                  <Chart title={`Cost per ${step === '1h' ? 'hour' : 'day'} by ${groupBy}`} series={chart.series} data={chart.data} fmt={(v) => money(v, currency)} step={step === '1h' ? 3600 : 86400} height={240} />
                </div>
              )}
              <div class="table-wrap spend-table">
                <table class="table cards" aria-label={`Spend by ${groupBy}`}>
                  <thead>
                    <tr>
                      <th scope="col">{GROUPS.find((g) => g.key === groupBy)!.label}</th>
                      <th scope="col" class="num">
                        Cost
                      </th>
                      <th scope="col" class="num">
                        GPU hours
                      </th>
                      <th scope="col" class="num">
                        Prompt tokens
                      </th>
                      <th scope="col" class="num">
                        Completion tokens
                      </th>
                      <th scope="col" class="num">
                        Cost / 1M tokens
                      </th>
                    </tr>
                  </thead>
                  <tbody>
                    {report.groups.map((g) => (
                      <tr data-group={g.key}>
                        <td data-label="Group">{g.key || <span class="muted">(none)</span>}</td>
                        <td class="num" data-label="Cost">
                          {money(g.cost, currency)}
                        </td>
                        <td class="num" data-label="GPU hours">
                          {g.gpu_hours.toFixed(2)}
                        </td>
                        <td class="num" data-label="Prompt tokens">
                          {num(g.prompt_tokens)}
                        </td>
                        <td class="num" data-label="Completion tokens">
                          {num(g.completion_tokens)}
                        </td>
                        <td class="num" data-label="Cost / 1M tokens">
                          {cpm(g.cost_per_million_tokens)}
                        </td>
                      </tr>
                    ))}
                  </tbody>
                  <tfoot>
                    <tr>
                      <th scope="row">Total</th>
                      <td class="num">{money(report.total.cost, currency)}</td>
                      <td class="num">{report.total.gpu_hours.toFixed(2)}</td>
                      <td class="num">{num(report.total.prompt_tokens)}</td>
                      <td class="num">{num(report.total.completion_tokens)}</td>
                      <td class="num">{cpm(report.total.cost_per_million_tokens)}</td>
                    </tr>
                  </tfoot>
                </table>
              </div>
            </>
          )}
        </>
      )}
    </section>
  )
}
