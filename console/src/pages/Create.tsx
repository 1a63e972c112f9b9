import { useEffect, useRef, useState } from 'preact/hooks'
import { api, ApiError, type InstanceType, type Model, type Provider } from '../api'
import { ProjectField } from '../components/project'
import { Loading, Notice } from '../components/ui'
import { mib, money } from '../format'
import { upsert } from '../store'

type Field = 'provider' | 'zone' | 'instance_type' | 'model' | 'count' | 'project'

export function Create({ onCreated }: { onCreated: (n: number) => void }) {
  const [providers, setProviders] = useState<Provider[] | null>(null)
  const [models, setModels] = useState<Model[] | null>(null)
  const [types, setTypes] = useState<InstanceType[] | null>(null)
  const [loadError, setLoadError] = useState<string | null>(null)
  const [provider, setProvider] = useState('')
  const [zone, setZone] = useState('')
  const [typeName, setTypeName] = useState('')
  const [model, setModel] = useState('')
  const [count, setCount] = useState('1')
  const [errors, setErrors] = useState<Partial<Record<Field, string>>>({})
  const [formError, setFormError] = useState<string | null>(null)
  const [busy, setBusy] = useState(false)
  const [project, setProject] = useState('')
  // The Idempotency-Key of the last request sent, and what it asked for:
  // pressing Create again for the same request (after an error, e.g. the
  // answer was lost) reuses it, so nothing is made twice.
  const attempt = useRef<{ body: string; key: string } | null>(null)

  useEffect(() => {
    const ctrl = new AbortController()
    Promise.all([api.providers(ctrl.signal), api.models(ctrl.signal)]).then(
      ([p, m]) => {
        setProviders(p.providers)
        setModels(m.models)
        if (p.providers.length === 1) setProvider(p.providers[0].name)
      },
      (e) => !ctrl.signal.aborted && setLoadError(e instanceof ApiError ? e.message : String(e)),
    )
    return () => ctrl.abort()
  }, [])

  useEffect(() => {
    setTypes(null)
    setTypeName('')
    setZone('')
    if (!provider) return
    const ctrl = new AbortController()
    api.instanceTypes(provider, ctrl.signal).then(
      (l) => setTypes(l.instance_types),
      (e) => !ctrl.signal.aborted && setLoadError(e instanceof ApiError ? e.message : String(e)),
    )
    return () => ctrl.abort()
  }, [provider])

  const prov = providers?.find((p) => p.name === provider)
  const zoneTypes = (types ?? []).filter((t) => !zone || t.zones.includes(zone))
  const type = types?.find((t) => t.name === typeName)
  const chosenModel = models?.find((m) => m.name === model)
  const n = Number(count)
  const vramTotal = type ? type.gpu.vram_mib * type.gpu.count : 0
  const tooSmall = !!(type && chosenModel && chosenModel.min_vram_mib > vramTotal)

  useEffect(() => {
    if (typeName && !zoneTypes.some((t) => t.name === typeName)) setTypeName('')
  }, [zone, types])

  const submit = async (e: Event) => {
    e.preventDefault()
    const local: Partial<Record<Field, string>> = {}
    if (!provider) local.provider = 'Choose a provider.'
    if (!typeName) local.instance_type = 'Choose an instance type.'
    if (!model) local.model = 'Choose a model.'
    if (count.trim() === '' || !Number.isFinite(n)) local.count = 'Enter a number.'
    if (!project) local.project = 'Choose the project they belong to.'
    setErrors(local)
    setFormError(null)
    if (Object.keys(local).length) return
    setBusy(true)
    try {
      const body = { provider, zone: zone || null, instance_type: typeName, model, count: n, project }
      const asked = JSON.stringify(body)
      if (attempt.current?.body !== asked) attempt.current = { body: asked, key: newIdempotencyKey() }
      const created = await api.create(body, attempt.current.key)
      attempt.current = null
      created.instances.forEach(upsert)
      onCreated(created.instances.length)
    } catch (err) {
      if (err instanceof ApiError && err.field && ['provider', 'zone', 'instance_type', 'model', 'count', 'project'].includes(err.field)) {
        setErrors({ [err.field as Field]: err.message })
      } else {
        setFormError(err instanceof ApiError ? err.message : String(err))
      }
    } finally {
      setBusy(false)
    }
  }

  const errorOf = (f: Field) =>
    errors[f] && (
      <p id={`${f}-error`} class="field-error" role="alert">
        {errors[f]}
      </p>
    )
  const described = (f: Field, help?: string) => [help, errors[f] ? `${f}-error` : undefined].filter(Boolean).join(' ') || undefined

  if (loadError && !providers) return <Notice tone="bad">Cannot load the catalog: {loadError}</Notice>
  if (!providers || !models) return <Loading what="the catalog" />

  return (
    <section aria-labelledby="create-title">
      <div class="page-head">
        <h1 id="create-title">Create instances</h1>
      </div>
      <form class="card form" onSubmit={submit} noValidate>
        {formError && <Notice tone="bad">{formError}</Notice>}
        <ProjectField id="project" value={project} onChange={setProject} need="operate" error={errors.project} />
        <div class="field">
          <label for="provider">Provider</label>
          <select id="provider" value={provider} onChange={(e) => setProvider(e.currentTarget.value)} aria-invalid={!!errors.provider} aria-describedby={described('provider')}>
            <option value="">Choose a provider…</option>
            {providers.map((p) => (
              <option value={p.name}>
                {p.name} ({p.instance_type_count} types)
              </option>
            ))}
          </select>
          {errorOf('provider')}
        </div>

        <div class="field">
          <label for="zone">Zone</label>
          <select id="zone" value={zone} disabled={!prov} onChange={(e) => setZone(e.currentTarget.value)} aria-invalid={!!errors.zone} aria-describedby={described('zone', 'zone-help')}>
            <option value="">Any zone offering the type</option>
            {prov?.zones.map((z) => (
              <option value={z.name}>
                {z.name} — {z.description}
              </option>
            ))}
          </select>
          <p id="zone-help" class="help">
            Left empty, the first zone that offers the type is used.
          </p>
          {errorOf('zone')}
        </div>

        <fieldset class="field" aria-describedby={described('instance_type')} aria-invalid={!!errors.instance_type}>
          <legend>Instance type</legend>
          {!provider ? (
            <p class="muted">Choose a provider first.</p>
          ) : !types ? (
            <Loading what="instance types" />
          ) : zoneTypes.length === 0 ? (
            <p class="muted">No instance type is offered in this zone.</p>
          ) : (
            <div class="type-grid">
              {zoneTypes.map((t) => (
                <label class={t.name === typeName ? 'type-card on' : 'type-card'}>
                  <input type="radio" name="instance_type" value={t.name} checked={t.name === typeName} onChange={() => setTypeName(t.name)} />
                  <span class="type-name">{t.name}</span>
                  <span class="type-gpu">
                    {t.gpu.count}× {t.gpu.model}
                  </span>
                  <span class="muted small">
                    {mib(t.gpu.vram_mib)} VRAM{t.gpu.count > 1 ? ' each' : ''} · {t.vcpus} vCPU · {mib(t.ram_mib)} RAM
                  </span>
                  <span class="type-price">{money(t.price_per_hour, t.currency)}/h</span>
                </label>
              ))}
            </div>
          )}
          {errorOf('instance_type')}
        </fieldset>

        <div class="field">
          <label for="model">Model</label>
          <select id="model" value={model} onChange={(e) => setModel(e.currentTarget.value)} aria-invalid={!!errors.model || tooSmall} aria-describedby={described('model', 'model-help')}>
            <option value="">Choose a model…</option>
            {models.map((m) => (
              <option value={m.name}>
                {m.name}
                {m.min_vram_mib ? ` (needs ${mib(m.min_vram_mib)})` : ''}
              </option>
            ))}
          </select>
          <p id="model-help" class={tooSmall ? 'help warn' : 'help'}>
            {tooSmall
              ? `${model} needs ${mib(chosenModel!.min_vram_mib)} of VRAM; ${typeName} has ${mib(vramTotal)}.`
              : (chosenModel?.description ?? 'The model the engine serves.')}
          </p>
          {errorOf('model')}
        </div>

        <div class="field narrow">
          <label for="count">Count</label>
          <input id="count" type="number" min={1} step={1} inputMode="numeric" value={count} onInput={(e) => setCount(e.currentTarget.value)} aria-invalid={!!errors.count} aria-describedby={described('count')} />
          {errorOf('count')}
        </div>

        {type && Number.isInteger(n) && n > 0 && (
          <p class="summary" aria-live="polite">
            {n} × {type.name} = {money(type.price_per_hour * n, type.currency)}/h
          </p>
        )}

        <div class="form-actions">
          <button type="submit" class="btn btn-primary" disabled={busy}>
            {busy ? 'Creating…' : n > 1 ? `Create ${n} instances` : 'Create instance'}
          </button>
          <a href="#/instances" class="btn">
            Cancel
          </a>
        </div>
      </form>
    </section>
  )
}

/** A random key for one create request (a UUID where the browser has it). */
function newIdempotencyKey(): string {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID()
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('')
}
