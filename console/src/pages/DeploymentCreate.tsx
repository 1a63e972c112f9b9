import { useEffect, useState } from 'preact/hooks'
import { ProjectField } from '../components/project'
import { api, ApiError, SCALING_METRICS, type CreateDeploymentBody, type InstanceType, type Model, type Placement, type Provider, type ScalingMetric } from '../api'
import { Loading, Notice } from '../components/ui'
import { mib, money } from '../format'
import { rememberDeployment, useCatalog } from '../store'

/** An API field path (`placements[1].zone`, `replicas.min`) as an element id. */
export function fieldId(field: string): string {
  return 'dep-' + field.replace(/[^a-z0-9_]+/gi, '-').replace(/-+$/, '')
}

/** Field errors by API field path, shown next to the field whose id is `fieldId(path)`. */
export type FieldErrors = Record<string, string>

export function FieldError({ errors, field }: { errors: FieldErrors; field: string }) {
  return errors[field] ? (
    <p id={`${fieldId(field)}-error`} class="field-error" role="alert">
      {errors[field]}
    </p>
  ) : null
}

/** Props that tie an input to its label id, help and error. */
export function fieldProps(errors: FieldErrors, field: string, help?: string) {
  return {
    id: fieldId(field),
    'aria-invalid': !!errors[field],
    'aria-describedby': [help, errors[field] ? `${fieldId(field)}-error` : undefined].filter(Boolean).join(' ') || undefined,
  }
}

const NAME_RE = /^[a-z0-9][a-z0-9-]{0,62}$/

export function DeploymentCreate({ onCreated }: { onCreated: (id: string, name: string) => void }) {
  const catalog = useCatalog()
  const [providers, setProviders] = useState<Provider[] | null>(null)
  const [models, setModels] = useState<Model[] | null>(null)
  const [loadError, setLoadError] = useState<string | null>(null)
  const [name, setName] = useState('')
  const [model, setModel] = useState('')
  const [placements, setPlacements] = useState<Placement[]>([{ provider: '', zone: '', instance_type: '' }])
  const [min, setMin] = useState('1')
  const [max, setMax] = useState('1')
  const [metric, setMetric] = useState<ScalingMetric>('requests_in_flight')
  const [target, setTarget] = useState('16')
  const [downDelay, setDownDelay] = useState('5m')
  const [toZero, setToZero] = useState('')
  const [errors, setErrors] = useState<FieldErrors>({})
  const [formError, setFormError] = useState<string | null>(null)
  const [busy, setBusy] = useState(false)
  const [project, setProject] = useState('')

  useEffect(() => {
    const ctrl = new AbortController()
    Promise.all([api.providers(ctrl.signal), api.models(ctrl.signal)]).then(
      ([p, m]) => {
        setProviders(p.providers)
        setModels(m.models)
        if (p.providers.length === 1) setPlacements((ps) => ps.map((x) => (x.provider ? x : { ...x, provider: p.providers[0].name })))
      },
      (e) => !ctrl.signal.aborted && setLoadError(e instanceof ApiError ? e.message : String(e)),
    )
    return () => ctrl.abort()
  }, [])

  const typesOf = (provider: string): InstanceType[] =>
    !catalog ? [] : [...catalog.entries()].filter(([k]) => k.startsWith(provider + '/')).map(([, t]) => t)
  const chosenModel = models?.find((m) => m.name === model)

  const update = (i: number, change: Partial<Placement>) =>
    setPlacements((ps) =>
      ps.map((p, k) => {
        if (k !== i) return p
        const next = { ...p, ...change }
        // A new provider empties zone and type; a zone that does not offer the type empties the type.
        if (change.provider !== undefined && change.provider !== p.provider) {
          next.zone = ''
          next.instance_type = ''
        }
        if (change.zone !== undefined && next.instance_type) {
          const t = typesOf(next.provider).find((x) => x.name === next.instance_type)
          if (t && next.zone && !t.zones.includes(next.zone)) next.instance_type = ''
        }
        return next
      }),
    )
  const add = () =>
    setPlacements((ps) => [...ps, { provider: providers?.length === 1 ? providers[0].name : '', zone: '', instance_type: '' }])
  const remove = (i: number) => setPlacements((ps) => ps.filter((_, k) => k !== i))
  const move = (i: number, by: number) =>
    setPlacements((ps) => {
      const j = i + by
      if (j < 0 || j >= ps.length) return ps
      const next = [...ps]
      ;[next[i], next[j]] = [next[j], next[i]]
      return next
    })

  const int = (v: string) => (v.trim() !== '' && Number.isFinite(Number(v)) ? Number(v) : null)

  const submit = async (e: Event) => {
    e.preventDefault()
    // Only what the API cannot be asked about is checked here; the rules are the API's.
    const local: FieldErrors = {}
    if (!name.trim()) local.name = 'Enter a name.'
    else if (!NAME_RE.test(name.trim())) local.name = 'Use lowercase letters, digits and "-" (at most 63), starting with a letter or digit.'
    if (!model) local.model = 'Choose a model.'
    placements.forEach((p, i) => {
      if (!p.provider) local[`placements[${i}].provider`] = 'Choose a provider.'
      else if (!p.zone) local[`placements[${i}].zone`] = 'Choose a zone.'
      else if (!p.instance_type) local[`placements[${i}].instance_type`] = 'Choose an instance type.'
    })
    if (!placements.length) local.placements = 'Add at least one placement.'
    if (!project) local.project = 'Choose the project it belongs to.'
    const minN = int(min)
    const maxN = int(max)
    const targetN = int(target)
    if (minN === null) local['replicas.min'] = 'Enter a number.'
    if (maxN === null) local['replicas.max'] = 'Enter a number.'
    if (targetN === null) local['autoscaling.target_per_replica'] = 'Enter a number.'
    if (!downDelay.trim()) local['autoscaling.scale_down_delay'] = 'Enter a duration, e.g. 5m.'
    setErrors(local)
    setFormError(null)
    if (Object.keys(local).length) return
    const body: CreateDeploymentBody = {
      name: name.trim(),
      model,
      placements,
      replicas: { min: minN!, max: maxN! },
      autoscaling: { metric, target_per_replica: targetN!, scale_down_delay: downDelay.trim() },
    }
    if (toZero.trim()) body.scale_to_zero_after = toZero.trim()
    body.project = project
    setBusy(true)
    try {
      const d = await api.createDeployment(body)
      rememberDeployment(d)
      onCreated(d.id, d.name)
    } catch (err) {
      if (err instanceof ApiError && err.field && document.getElementById(fieldId(err.field))) {
        setErrors({ [err.field]: err.message })
      } else if (err instanceof ApiError && err.status === 409) {
        setErrors({ name: err.message })
      } else {
        setFormError(err instanceof ApiError ? (err.field ? `${err.field}: ${err.message}` : err.message) : String(err))
      }
    } finally {
      setBusy(false)
    }
  }

  if (loadError && !providers) return <Notice tone="bad">Cannot load the catalog: {loadError}</Notice>
  if (!providers || !models) return <Loading what="the catalog" />

  const metricInfo = SCALING_METRICS.find((m) => m.value === metric)!

  return (
    <section aria-labelledby="create-deployment-title">
      <p class="crumbs">
        <a href="#/deployments">Deployments</a> / new
      </p>
      <div class="page-head">
        <h1 id="create-deployment-title">Create deployment</h1>
      </div>
      <form class="card form" onSubmit={submit} noValidate data-testid="deployment-form">
        {formError && <Notice tone="bad">{formError}</Notice>}
        <div class="field">
          <label for={fieldId('name')}>Name</label>
          <input
            type="text"
            autocomplete="off"
            spellcheck={false}
            placeholder="qwen-7b"
            value={name}
            onInput={(e) => setName(e.currentTarget.value)}
            {...fieldProps(errors, 'name', 'dep-name-help')}
          />
          <p id="dep-name-help" class="help">
            Lowercase letters, digits and "-"; unique among deployments.
          </p>
          <FieldError errors={errors} field="name" />
        </div>

        <ProjectField id={fieldId('project')} value={project} onChange={setProject} need="operate" error={errors.project} />

        <div class="field">
          <label for={fieldId('model')}>Model</label>
          <select value={model} onChange={(e) => setModel(e.currentTarget.value)} {...fieldProps(errors, 'model', 'dep-model-help')}>
            <option value="">Choose a model…</option>
            {models.map((m) => (
              <option value={m.name}>
                {m.name}
                {m.min_vram_mib ? ` (needs ${mib(m.min_vram_mib)})` : ''}
              </option>
            ))}
          </select>
          <p id="dep-model-help" class="help">
            {chosenModel?.description ?? 'The model every replica serves.'}
          </p>
          <FieldError errors={errors} field="model" />
        </div>

        <fieldset class="field" aria-describedby={errors.placements ? `${fieldId('placements')}-error dep-placements-help` : 'dep-placements-help'}>
          <legend id={fieldId('placements')} tabindex={-1}>
            Placements
          </legend>
          <p id="dep-placements-help" class="help">
            In order of preference: replicas go to the first placement with capacity; one out of capacity or quota is skipped for a while.
          </p>
          <ol class="placements" data-testid="placements">
            {placements.map((p, i) => {
              const prov = providers.find((x) => x.name === p.provider)
              const types = typesOf(p.provider).filter((t) => !p.zone || t.zones.includes(p.zone))
              const type = types.find((t) => t.name === p.instance_type)
              const vram = type ? type.gpu.vram_mib * type.gpu.count : 0
              const tooSmall = !!(type && chosenModel && chosenModel.min_vram_mib > vram)
              const f = (k: string) => `placements[${i}]${k}`
              return (
                <li class="placement" data-index={i}>
                  <fieldset class="placement-set" id={fieldId(f(''))} tabindex={-1} aria-describedby={errors[f('')] ? `${fieldId(f(''))}-error` : undefined}>
                    <legend>Placement {i + 1}</legend>
                    <div class="placement-fields">
                      <div class="field">
                        <label for={fieldId(f('.provider'))}>Provider</label>
                        <select value={p.provider} onChange={(e) => update(i, { provider: e.currentTarget.value })} {...fieldProps(errors, f('.provider'))}>
                          <option value="">Choose…</option>
                          {providers.map((x) => (
                            <option value={x.name}>{x.name}</option>
                          ))}
                        </select>
                        <FieldError errors={errors} field={f('.provider')} />
                      </div>
                      <div class="field">
                        <label for={fieldId(f('.zone'))}>Zone</label>
                        <select value={p.zone} disabled={!prov} onChange={(e) => update(i, { zone: e.currentTarget.value })} {...fieldProps(errors, f('.zone'))}>
                          <option value="">Choose…</option>
                          {prov?.zones.map((z) => (
                            <option value={z.name}>
                              {z.name} — {z.description}
                            </option>
                          ))}
                        </select>
                        <FieldError errors={errors} field={f('.zone')} />
                      </div>
                      <div class="field">
                        <label for={fieldId(f('.instance_type'))}>Instance type</label>
                        <select
                          value={p.instance_type}
                          disabled={!prov || !catalog}
                          onChange={(e) => update(i, { instance_type: e.currentTarget.value })}
                          {...fieldProps(errors, f('.instance_type'), tooSmall ? `${fieldId(f('.instance_type'))}-warn` : undefined)}
                        >
                          <option value="">{prov && !catalog ? 'Loading…' : 'Choose…'}</option>
                          {types.map((t) => (
                            <option value={t.name}>
                              {t.name} — {t.gpu.count}× {t.gpu.model}, {money(t.price_per_hour, t.currency)}/h
                            </option>
                          ))}
                        </select>
                        {tooSmall && (
                          <p id={`${fieldId(f('.instance_type'))}-warn`} class="help warn">
                            {model} needs {mib(chosenModel!.min_vram_mib)} of VRAM; {type!.name} has {mib(vram)}.
                          </p>
                        )}
                        <FieldError errors={errors} field={f('.instance_type')} />
                      </div>
                      <div class="placement-actions">
                        <button type="button" class="btn btn-small" disabled={i === 0} onClick={() => move(i, -1)} aria-label={`Move placement ${i + 1} up`}>
                          ↑
                        </button>
                        <button type="button" class="btn btn-small" disabled={i === placements.length - 1} onClick={() => move(i, 1)} aria-label={`Move placement ${i + 1} down`}>
                          ↓
                        </button>
                        <button type="button" class="btn btn-small btn-danger-outline" disabled={placements.length === 1} onClick={() => remove(i)} aria-label={`Remove placement ${i + 1}`}>
                          Remove
                        </button>
                      </div>
                    </div>
                    <FieldError errors={errors} field={f('')} />
                  </fieldset>
                </li>
              )
            })}
          </ol>
          <div>
            <button type="button" class="btn btn-small" onClick={add} disabled={placements.length >= 16}>
              Add a fallback placement
            </button>
          </div>
          <FieldError errors={errors} field="placements" />
        </fieldset>

        <fieldset class="field">
          <legend>Replicas</legend>
          <div class="field-row">
            <div class="field narrow">
              <label for={fieldId('replicas.min')}>Minimum replicas</label>
              <input type="number" min={0} step={1} inputMode="numeric" value={min} onInput={(e) => setMin(e.currentTarget.value)} {...fieldProps(errors, 'replicas.min')} />
              <FieldError errors={errors} field="replicas.min" />
            </div>
            <div class="field narrow">
              <label for={fieldId('replicas.max')}>Maximum replicas</label>
              <input type="number" min={1} step={1} inputMode="numeric" value={max} onInput={(e) => setMax(e.currentTarget.value)} {...fieldProps(errors, 'replicas.max')} />
              <FieldError errors={errors} field="replicas.max" />
            </div>
          </div>
        </fieldset>

        <fieldset class="field">
          <legend>Autoscaling</legend>
          <div class="field-row">
            <div class="field">
              <label for={fieldId('autoscaling.metric')}>Metric</label>
              <select value={metric} onChange={(e) => setMetric(e.currentTarget.value as ScalingMetric)} {...fieldProps(errors, 'autoscaling.metric', 'dep-metric-help')}>
                {SCALING_METRICS.map((m) => (
                  <option value={m.value}>{m.label}</option>
                ))}
              </select>
              <FieldError errors={errors} field="autoscaling.metric" />
            </div>
            <div class="field narrow">
              <label for={fieldId('autoscaling.target_per_replica')}>Target per replica</label>
              <input
                type="number"
                min={0}
                step="any"
                inputMode="decimal"
                value={target}
                onInput={(e) => setTarget(e.currentTarget.value)}
                {...fieldProps(errors, 'autoscaling.target_per_replica')}
              />
              <FieldError errors={errors} field="autoscaling.target_per_replica" />
            </div>
            <div class="field narrow">
              <label for={fieldId('autoscaling.scale_down_delay')}>Scale-down delay</label>
              <input
                type="text"
                autocomplete="off"
                spellcheck={false}
                value={downDelay}
                onInput={(e) => setDownDelay(e.currentTarget.value)}
                {...fieldProps(errors, 'autoscaling.scale_down_delay', 'dep-delay-help')}
              />
              <FieldError errors={errors} field="autoscaling.scale_down_delay" />
            </div>
          </div>
          <p id="dep-metric-help" class="help">
            {metricInfo.help} Above the target on average, replicas are added at once (up to the maximum).
          </p>
          <p id="dep-delay-help" class="help">
            How long a lower load must last before replicas are removed: a whole number and a unit, e.g. 30s, 5m, 1h.
          </p>
        </fieldset>

        <div class="field narrow">
          <label for={fieldId('scale_to_zero_after')}>Scale to zero after (optional)</label>
          <input
            type="text"
            autocomplete="off"
            spellcheck={false}
            placeholder="e.g. 1h"
            value={toZero}
            onInput={(e) => setToZero(e.currentTarget.value)}
            {...fieldProps(errors, 'scale_to_zero_after', 'dep-zero-help')}
          />
          <p id="dep-zero-help" class="help">
            Needed for a minimum of 0. Kept with the deployment; the control plane does not act on it yet.
          </p>
          <FieldError errors={errors} field="scale_to_zero_after" />
        </div>

        <div class="form-actions">
          <button type="submit" class="btn btn-primary" disabled={busy}>
            {busy ? 'Creating…' : 'Create deployment'}
          </button>
          <a href="#/deployments" class="btn">
            Cancel
          </a>
        </div>
      </form>
    </section>
  )
}
