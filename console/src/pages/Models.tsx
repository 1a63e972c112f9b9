import { useState } from 'preact/hooks'
import { api, ApiError, type Model } from '../api'
import { Empty, Loading, Notice } from '../components/ui'
import { mib } from '../format'
import { usePoll } from '../store'

export function Models() {
  const [models, setModels] = useState<Model[] | null>(null)
  const [error, setError] = useState<string | null>(null)
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
  const rates = models?.some((m) => typeof m.requests_per_second === 'number')

  return (
    <section aria-labelledby="models-title">
      <div class="page-head">
        <h1 id="models-title">Models</h1>
      </div>
      {error && <Notice tone="bad">{error}</Notice>}
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
                  <th scope="col">Description</th>
                  <th scope="col" class="num">Min. VRAM</th>
                  <th scope="col">Routable</th>
                  <th scope="col" class="num">Ready instances</th>
                  <th scope="col" class="num">Requests/s</th>
                </tr>
              </thead>
              <tbody>
                {models.map((m) => (
                  <tr data-model={m.name}>
                    <td class="mono">{m.name}</td>
                    <td>{m.description}</td>
                    <td class="num">{m.min_vram_mib ? mib(m.min_vram_mib) : '—'}</td>
                    <td>{m.ready_instances > 0 ? <span class="badge badge-ok">routable</span> : <span class="badge badge-muted">no ready instance</span>}</td>
                    <td class="num">{m.ready_instances}</td>
                    <td class="num">{typeof m.requests_per_second === 'number' ? m.requests_per_second.toFixed(2) : <span class="muted">—</span>}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          {!rates && <p class="muted small">Request rates are not available yet: they appear once the OpenAI-compatible router reports them.</p>}
        </>
      )}
    </section>
  )
}
