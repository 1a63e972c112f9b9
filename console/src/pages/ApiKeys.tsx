import { useEffect, useState } from 'preact/hooks'
import { api, ApiError, type ApiKey, type CreateApiKeyBody, type CreatedApiKey, type Model, type PatchApiKeyBody } from '../api'
import { ProjectField } from '../components/project'
import { Confirm, Empty, errorText, Loading, Notice, SecretOnce } from '../components/ui'
import { dateTime, money, num } from '../format'
import { allows, canHere, roleIn, useSession } from '../session'
import { usePoll } from '../store'

const CURRENCY = 'EUR'

type LimitField = 'rpm' | 'tpm' | 'monthly_budget'

interface Limits {
  rpm: string
  tpm: string
  monthly_budget: string
}

const noLimits: Limits = { rpm: '', tpm: '', monthly_budget: '' }

/** Parses the limit inputs: empty is no limit (null). Returns errors by field. */
function parseLimits(l: Limits): { body: PatchApiKeyBody; errors: Partial<Record<LimitField, string>> } {
  const body: PatchApiKeyBody = {}
  const errors: Partial<Record<LimitField, string>> = {}
  for (const f of ['rpm', 'tpm'] as const) {
    const v = l[f].trim()
    if (v === '') body[f] = null
    else {
      const n = Number(v)
      if (!Number.isInteger(n) || n < 1 || n > 10_000_000) errors[f] = 'A whole number from 1 to 10,000,000, or empty for no limit.'
      else body[f] = n
    }
  }
  const b = l.monthly_budget.trim()
  if (b === '') body.monthly_budget = null
  else {
    const n = Number(b)
    if (!Number.isFinite(n) || n < 0) errors.monthly_budget = 'An amount of 0 or more, or empty for no budget.'
    else body.monthly_budget = n
  }
  return { body, errors }
}

function LimitInputs({ prefix, value, onChange, errors }: { prefix: string; value: Limits; onChange: (l: Limits) => void; errors: Partial<Record<LimitField, string>> }) {
  const field = (f: LimitField, label: string, help: string, step?: string) => (
    <div class="field narrow">
      <label for={`${prefix}-${f}`}>{label}</label>
      <input
        id={`${prefix}-${f}`}
        type="number"
        min={f === 'monthly_budget' ? 0 : 1}
        step={step ?? 1}
        placeholder="no limit"
        value={value[f]}
        onInput={(e) => onChange({ ...value, [f]: e.currentTarget.value })}
        aria-invalid={errors[f] ? 'true' : undefined}
        aria-describedby={`${prefix}-${f}-help${errors[f] ? ` ${prefix}-${f}-error` : ''}`}
      />
      <p id={`${prefix}-${f}-help`} class="help">
        {help}
      </p>
      {errors[f] && (
        <p id={`${prefix}-${f}-error`} class="field-error" role="alert">
          {errors[f]}
        </p>
      )}
    </div>
  )
  return (
    <div class="field-row">
      {field('rpm', 'Requests per minute', 'Over it: 429.')}
      {field('tpm', 'Tokens per minute', 'Prompt and completion.')}
      {field('monthly_budget', `Monthly budget (${CURRENCY})`, 'Per calendar month, UTC.', '0.01')}
    </div>
  )
}

const limitText = (v: number | null | undefined) => (v === undefined ? <span class="muted">—</span> : v === null ? <span class="muted">none</span> : num(v))

export function ApiKeys() {
  const s = useSession()
  const [keys, setKeys] = useState<ApiKey[] | null>(null)
  const [models, setModels] = useState<Model[]>([])
  const [error, setError] = useState<string | null>(null)
  const [flash, setFlash] = useState<string | null>(null)
  const [reload, setReload] = useState(0)
  const [showRevoked, setShowRevoked] = useState(false)
  // Create form.
  const [creating, setCreating] = useState(false)
  const [name, setName] = useState('')
  const [project, setProject] = useState('')
  const [chosenModels, setChosenModels] = useState<string[]>([])
  const [limits, setLimits] = useState<Limits>(noLimits)
  const [errors, setErrors] = useState<Partial<Record<LimitField | 'name' | 'project' | 'models', string>>>({})
  const [formError, setFormError] = useState<string | null>(null)
  const [busy, setBusy] = useState(false)
  const [created, setCreated] = useState<CreatedApiKey | null>(null)
  // Edit limits of one key.
  const [editing, setEditing] = useState<ApiKey | null>(null)
  const [editLimits, setEditLimits] = useState<Limits>(noLimits)
  const [editErrors, setEditErrors] = useState<Partial<Record<LimitField, string>>>({})
  const [editError, setEditError] = useState<string | null>(null)
  const [confirm, setConfirm] = useState<ApiKey | null>(null)

  usePoll(
    async (signal) => {
      try {
        const l = await api.apiKeys(s.project, signal)
        setKeys(l.api_keys)
        setError(null)
      } catch (e) {
        if (!signal.aborted) setError(errorText(e))
      }
    },
    15000,
    [s.project, reload],
  )

  useEffect(() => {
    const ctrl = new AbortController()
    api.models(ctrl.signal).then(
      (m) => setModels(m.models),
      () => undefined,
    )
    return () => ctrl.abort()
  }, [])

  const mayCreate = canHere(s, 'manage_keys')
  const mayManage = (k: ApiKey) => allows(roleIn(s, k.project_id), 'manage_keys')

  const create = async (e: Event) => {
    e.preventDefault()
    const { body: lim, errors: limErrors } = parseLimits(limits)
    const local: typeof errors = { ...limErrors }
    if (!name.trim()) local.name = 'Name the key (who or what uses it).'
    if (!project) local.project = 'Choose the project the key belongs to.'
    setErrors(local)
    setFormError(null)
    if (Object.keys(local).length) return
    const body: CreateApiKeyBody = { name: name.trim(), project }
    if (chosenModels.length) body.models = chosenModels
    // Limits only when set: a server without key limits refuses unknown fields.
    if (lim.rpm != null) body.rpm = lim.rpm
    if (lim.tpm != null) body.tpm = lim.tpm
    if (lim.monthly_budget != null) body.monthly_budget = lim.monthly_budget
    setBusy(true)
    try {
      const k = await api.createApiKey(body)
      setCreated(k)
      setCreating(false)
      setName('')
      setChosenModels([])
      setLimits(noLimits)
      setReload((r) => r + 1)
    } catch (err) {
      if (err instanceof ApiError && err.field && ['name', 'project', 'models', 'rpm', 'tpm', 'monthly_budget'].includes(err.field)) setErrors({ [err.field]: err.message })
      else setFormError(errorText(err))
    } finally {
      setBusy(false)
    }
  }

  const startEdit = (k: ApiKey) => {
    setEditing(k)
    setEditErrors({})
    setEditError(null)
    const str = (v: number | null | undefined) => (v === null || v === undefined ? '' : String(v))
    setEditLimits({ rpm: str(k.rpm), tpm: str(k.tpm), monthly_budget: str(k.monthly_budget) })
  }

  const saveLimits = async (e: Event) => {
    e.preventDefault()
    if (!editing) return
    const { body, errors: errs } = parseLimits(editLimits)
    setEditErrors(errs)
    setEditError(null)
    if (Object.keys(errs).length) return
    try {
      await api.patchApiKey(editing.id, body)
      setFlash(`Limits of ${editing.name} saved.`)
      setEditing(null)
      setReload((r) => r + 1)
    } catch (err) {
      if (err instanceof ApiError && err.field && ['rpm', 'tpm', 'monthly_budget'].includes(err.field)) setEditErrors({ [err.field as LimitField]: err.message })
      else setEditError(errorText(err))
    }
  }

  const revoke = async (k: ApiKey) => {
    setConfirm(null)
    setError(null)
    try {
      await api.revokeApiKey(k.id)
      setFlash(`Revoked ${k.name}.`)
      setReload((r) => r + 1)
    } catch (err) {
      setError(`Could not revoke ${k.name}: ${errorText(err)}`)
    }
  }

  const rows = (keys ?? []).filter((k) => showRevoked || !k.revoked_at)
  const revokedCount = (keys ?? []).filter((k) => k.revoked_at).length

  return (
    <section aria-labelledby="keys-title">
      <div class="page-head">
        <h1 id="keys-title">API keys</h1>
        {mayCreate && !creating && (
          <button type="button" class="btn btn-primary" onClick={() => (setCreating(true), setCreated(null))}>
            Create API key
          </button>
        )}
      </div>
      <p class="muted">
        Keys of the OpenAI-compatible endpoint (<code>/v1/chat/completions</code>). A key reaches its own project's instances only.
        {s.project ? ` Showing project ${s.project}.` : ''}
      </p>
      {!mayCreate && s.me && <Notice>Your role here does not allow managing API keys: you can look, not change.</Notice>}
      {flash && <Notice>{flash}</Notice>}
      {error && <Notice tone="bad">{error}</Notice>}
      {created && <SecretOnce label={`Key “${created.name}”:`} secret={created.key} onDone={() => setCreated(null)} />}

      {creating && (
        <form class="card form" onSubmit={create} noValidate aria-labelledby="new-key-title" data-testid="key-form">
          <h2 id="new-key-title">New API key</h2>
          {formError && <Notice tone="bad">{formError}</Notice>}
          <div class="field">
            <label for="key-name">Name</label>
            <input id="key-name" value={name} maxLength={100} onInput={(e) => setName(e.currentTarget.value)} aria-invalid={errors.name ? 'true' : undefined} aria-describedby={errors.name ? 'key-name-error' : undefined} />
            {errors.name && (
              <p id="key-name-error" class="field-error" role="alert">
                {errors.name}
              </p>
            )}
          </div>
          <ProjectField id="key-project" value={project} onChange={setProject} need="manage_keys" error={errors.project} />
          <fieldset class="field" aria-describedby="key-models-help">
            <legend>Models</legend>
            <p id="key-models-help" class="help">
              None ticked: every model of the project.
            </p>
            <div class="check-list">
              {models.map((m) => (
                <label class="inline">
                  <input
                    type="checkbox"
                    checked={chosenModels.includes(m.name)}
                    onChange={(e) => setChosenModels(e.currentTarget.checked ? [...chosenModels, m.name] : chosenModels.filter((x) => x !== m.name))}
                  />
                  {m.name}
                </label>
              ))}
            </div>
            {errors.models && (
              <p class="field-error" role="alert">
                {errors.models}
              </p>
            )}
          </fieldset>
          <LimitInputs prefix="key" value={limits} onChange={setLimits} errors={errors} />
          <div class="form-actions">
            <button type="submit" class="btn btn-primary" disabled={busy}>
              {busy ? 'Creating…' : 'Create key'}
            </button>
            <button type="button" class="btn" onClick={() => setCreating(false)}>
              Cancel
            </button>
          </div>
        </form>
      )}

      {editing && (
        <form class="card form" onSubmit={saveLimits} noValidate aria-labelledby="edit-key-title" data-testid="limits-form">
          <h2 id="edit-key-title">Limits of {editing.name}</h2>
          {editError && <Notice tone="bad">{editError}</Notice>}
          <LimitInputs prefix="edit" value={editLimits} onChange={setEditLimits} errors={editErrors} />
          <div class="form-actions">
            <button type="submit" class="btn btn-primary">
              Save limits
            </button>
            <button type="button" class="btn" onClick={() => setEditing(null)}>
              Cancel
            </button>
          </div>
        </form>
      )}

      <div class="toolbar">
        <label class="inline">
          <input type="checkbox" checked={showRevoked} onChange={(e) => setShowRevoked(e.currentTarget.checked)} />
          Show revoked keys ({revokedCount})
        </label>
      </div>

      {!keys ? (
        <Loading what="API keys" />
      ) : rows.length === 0 ? (
        <Empty title={keys.length ? 'Only revoked keys here.' : 'No API keys yet.'}>{mayCreate && <p>Create one to send requests to the OpenAI-compatible endpoint.</p>}</Empty>
      ) : (
        <div class="table-wrap">
          <table class="table cards" aria-label="API keys">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Project</th>
                <th scope="col">Models</th>
                <th scope="col" class="num">RPM</th>
                <th scope="col" class="num">TPM</th>
                <th scope="col" class="num">Monthly budget</th>
                <th scope="col" class="num">Spent this month</th>
                <th scope="col">Created</th>
                <th scope="col">Revoked</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {rows.map((k) => (
                <tr data-id={k.id} data-name={k.name}>
                  <td data-label="Name">{k.name}</td>
                  <td data-label="Project">{k.project_id}</td>
                  <td data-label="Models">{k.models?.length ? k.models.join(', ') : <span class="muted">all</span>}</td>
                  <td class="num" data-label="RPM">
                    {limitText(k.rpm)}
                  </td>
                  <td class="num" data-label="TPM">
                    {limitText(k.tpm)}
                  </td>
                  <td class="num" data-label="Monthly budget">
                    {k.monthly_budget === undefined ? <span class="muted">—</span> : k.monthly_budget === null ? <span class="muted">none</span> : money(k.monthly_budget, CURRENCY)}
                  </td>
                  <td class="num" data-label="Spent this month">
                    {k.spent_this_month === undefined || k.spent_this_month === null ? <span class="muted">—</span> : money(k.spent_this_month, CURRENCY)}
                  </td>
                  <td data-label="Created">{dateTime(k.created_at)}</td>
                  <td data-label="Revoked">{k.revoked_at ? dateTime(k.revoked_at) : <span class="muted">—</span>}</td>
                  <td class="actions" data-label="">
                    {!k.revoked_at && mayManage(k) && (
                      <>
                        <button type="button" class="btn btn-small" onClick={() => startEdit(k)} aria-label={`Edit limits of ${k.name}`}>
                          Limits
                        </button>
                        <button type="button" class="btn btn-small btn-danger-outline" onClick={() => setConfirm(k)} aria-label={`Revoke ${k.name}`}>
                          Revoke
                        </button>
                      </>
                    )}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}

      <Confirm open={!!confirm} title="Revoke this API key?" confirmLabel="Revoke" onCancel={() => setConfirm(null)} onConfirm={() => confirm && revoke(confirm)}>
        <p>
          Requests with <strong>{confirm?.name}</strong> are refused from now on. This cannot be undone.
        </p>
      </Confirm>
    </section>
  )
}
