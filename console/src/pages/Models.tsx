import { useEffect, useState } from 'preact/hooks'
import { api, ApiError, type Instance, type Model, type Usage } from '../api'
import { Empty, Loading, Notice, StatusBadge } from '../components/ui'
import { duration, mib, num, perSec, shortId } from '../format'
import { useFleet, usePoll } from '../store'
import { sumRates, useUsage, type Rates } from '../usage'

/** Instances the live list no longer holds (archived), looked up once for their model. */
const archived = new Map<string, Instance>()
let archivedLookup = 0

export function Models() {
  const fleet = useFleet()
  const usage = useUsage()
  const [models, setModels] = useState<Model[] | null>(null)
  const [error, setError] = useState<string | null>(null)
  const [, setLookups] = useState(0)
  usePoll(
    async (signal) => {
      try {
        const r = await api.models(signal)
        setModels(r.models)
        setError(null)
      } catch (e) {
        if (!signal.aborted) setError(e instanceof ApiError ? e.message : String(e))
      }
    },
    5000,
    [],
  )

  const instanceOf = (id: string) => fleet.instances.get(id) ?? archived.get(id)
  const used = usage.report?.instances ?? []
  // Usage of instances that left the live list: find their model (at most every 30 s).
  const unknown = used.filter((u) => !instanceOf(u.id)).map((u) => u.id)
  useEffect(() => {
    if (!unknown.length || !fleet.loaded || Date.now() - archivedLookup < 30_000) return
    archivedLookup = Date.now()
    let live = true
    api.instances({ includeArchived: true }).then(
      (l) => {
        for (const i of l.instances) if (i.status === 'archived') archived.set(i.id, i)
        if (live) setLookups((n) => n + 1)
      },
      () => undefined,
    )
    return () => {
      live = false
    }
  }, [unknown.join(','), fleet.loaded])

  const rate = (kind: 'key' | 'instance', id: string): Rates | undefined => usage.rates.get(`${kind}:${id}`)
  const byModel = new Map<string, Usage[]>()
  for (const u of used) {
    const model = instanceOf(u.id)?.model
    if (!model) continue
    byModel.set(model, [...(byModel.get(model) ?? []), u])
  }
  const modelTotals = (name: string) => {
    const list = byModel.get(name) ?? []
    return {
      rates: sumRates(list.map((u) => rate('instance', u.id))),
      requests: list.reduce((a, u) => a + u.requests, 0),
      errors: list.reduce((a, u) => a + u.errors, 0),
      prompt: list.reduce((a, u) => a + u.prompt_tokens, 0),
      completion: list.reduce((a, u) => a + u.completion_tokens, 0),
    }
  }
  const hasRates = usage.spanMs > 0
  const rateCell = (v: number | undefined) => (hasRates && v !== undefined ? perSec(v) : <span class="muted">…</span>)
  const instances = [...used].sort((a, b) => b.requests - a.requests)
  const keys = [...(usage.report?.keys ?? [])].sort((a, b) => b.requests - a.requests)

  return (
    <section aria-labelledby="models-title">
      <div class="page-head">
        <h1 id="models-title">Models</h1>
      </div>
      {error && <Notice tone="bad">{error}</Notice>}
      {usage.error && <Notice tone="bad">Usage: {usage.error}</Notice>}
      {!models ? (
        !error && <Loading what="models" />
      ) : models.length === 0 ? (
        <Empty title="No models are configured." />
      ) : (
        <>
          <div class="table-wrap">
            <table class="table" aria-label="Models">
              <thead>
                <tr>
                  <th scope="col">Model</th>
                  <th scope="col" class="num">Min. VRAM</th>
                  <th scope="col">Routable</th>
                  <th scope="col" class="num">Ready instances</th>
                  <th scope="col" class="num">Requests/s</th>
                  <th scope="col" class="num">Tokens/s</th>
                  <th scope="col" class="num">Requests</th>
                  <th scope="col" class="num">Errors</th>
                  <th scope="col" class="num">
                    Tokens <span class="th-sub">prompt / completion</span>
                  </th>
                </tr>
              </thead>
              <tbody>
                {models.map((m) => {
                  const t = modelTotals(m.name)
                  return (
                    <tr data-model={m.name}>
                      <td>
                        <span class="mono">{m.name}</span>
                        {m.description && <span class="model-desc">{m.description}</span>}
                      </td>
                      <td class="num">{m.min_vram_mib ? mib(m.min_vram_mib) : '—'}</td>
                      <td>{m.ready_instances > 0 ? <span class="badge badge-ok">routable</span> : <span class="badge badge-muted">no ready instance</span>}</td>
                      <td class="num">{m.ready_instances}</td>
                      <td class="num" data-col="rps">
                        {rateCell(t.rates.requests)}
                      </td>
                      <td class="num" data-col="tps" title="Prompt and completion tokens per second">
                        {rateCell(t.rates.prompt_tokens + t.rates.completion_tokens)}
                      </td>
                      <td class="num" data-col="requests">
                        {num(t.requests)}
                      </td>
                      <td class="num" data-col="errors">
                        {num(t.errors)}
                      </td>
                      <td class="num">
                        {num(t.prompt)} / {num(t.completion)}
                      </td>
                    </tr>
                  )
                })}
              </tbody>
            </table>
          </div>
          {usage.available === false ? (
            <p class="muted small">This control plane does not report router usage, so request rates are not shown.</p>
          ) : (
            <p class="muted small" data-testid="usage-note">
              Requests and tokens served through the OpenAI-compatible endpoint (<code>/v1/</code>) since the database was created, as the router last
              reported them; rates are the change {hasRates ? `over the last ${duration(usage.spanMs)}` : 'between polls (from the next poll on)'}.
            </p>
          )}

          <h2 id="usage-instances-title">By instance</h2>
          {!usage.report ? (
            usage.available !== false && !usage.error && <Loading what="usage" />
          ) : instances.length === 0 ? (
            <p class="muted">No requests served yet.</p>
          ) : (
            <div class="table-wrap">
              <table class="table" aria-labelledby="usage-instances-title" data-testid="usage-instances">
                <thead>
                  <tr>
                    <th scope="col">Instance</th>
                    <th scope="col">Model</th>
                    <th scope="col">Status</th>
                    <th scope="col" class="num">Requests/s</th>
                    <th scope="col" class="num">Requests</th>
                    <th scope="col" class="num">Errors</th>
                    <th scope="col" class="num">Prompt tokens</th>
                    <th scope="col" class="num">Completion tokens</th>
                    <th scope="col" class="num" title="No first token within the stall bound; retried elsewhere">Stalls</th>
                    <th scope="col" class="num" title="Times the circuit opened">Ejections</th>
                    <th scope="col" class="num" title="Streams continued on another instance">Failovers</th>
                  </tr>
                </thead>
                <tbody>
                  {instances.map((u) => {
                    const i = instanceOf(u.id)
                    return (
                      <tr data-usage-instance={u.id}>
                        <td class="mono">
                          <a href={`#/instances/${u.id}`}>{shortId(u.id)}</a>
                        </td>
                        <td class="mono">{i?.model ?? '—'}</td>
                        <td>{i ? <StatusBadge status={i.status} /> : <span class="muted">—</span>}</td>
                        <td class="num">{rateCell(rate('instance', u.id)?.requests)}</td>
                        <td class="num">{num(u.requests)}</td>
                        <td class="num">{num(u.errors)}</td>
                        <td class="num">{num(u.prompt_tokens)}</td>
                        <td class="num">{num(u.completion_tokens)}</td>
                        <td class="num">{num(u.stalls)}</td>
                        <td class="num">{num(u.ejections)}</td>
                        <td class="num">{num(u.failovers)}</td>
                      </tr>
                    )
                  })}
                </tbody>
              </table>
            </div>
          )}

          {keys.length > 0 && (
            <>
              <h2 id="usage-keys-title">By API key</h2>
              <div class="table-wrap">
                <table class="table" aria-labelledby="usage-keys-title" data-testid="usage-keys">
                  <thead>
                    <tr>
                      <th scope="col">Key</th>
                      <th scope="col" class="num">Requests/s</th>
                      <th scope="col" class="num">Requests</th>
                      <th scope="col" class="num">Errors</th>
                      <th scope="col" class="num">Prompt tokens</th>
                      <th scope="col" class="num">Completion tokens</th>
                    </tr>
                  </thead>
                  <tbody>
                    {keys.map((u) => (
                      <tr data-usage-key={u.id}>
                        <td>
                          {u.name ?? <span class="muted">unnamed</span>} <span class="mono muted small">{shortId(u.id)}</span>
                        </td>
                        <td class="num">{rateCell(rate('key', u.id)?.requests)}</td>
                        <td class="num">{num(u.requests)}</td>
                        <td class="num">{num(u.errors)}</td>
                        <td class="num">{num(u.prompt_tokens)}</td>
                        <td class="num">{num(u.completion_tokens)}</td>
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            </>
          )}
        </>
      )}
    </section>
  )
}
