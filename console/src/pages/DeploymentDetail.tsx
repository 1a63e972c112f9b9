import { useMemo, useState } from 'preact/hooks'
import { api, ApiError, SCALING_METRICS, type Deployment, type DeploymentEvent, type Instance } from '../api'
import { Chart } from '../components/Chart'
import { Confirm, Empty, Loading, Notice, StatusCell } from '../components/ui'
import { ago, dateTime, shortDuration, shortId, time } from '../format'
import { allows, roleIn, useSession } from '../session'
import { rememberDeployment, usePoll, useFleet, useTick } from '../store'
import { DeploymentStateBadge, placementText } from './Deployments'
import { fieldId, FieldError, fieldProps, type FieldErrors } from './DeploymentCreate'

/** How often the deployment is read (and a point added to the replicas chart). */
const POLL_MS = 3000
/** Points kept per deployment: 20 minutes at one every 3 s. */
const MAX_POINTS = 400

interface Point {
  /** Unix seconds. */
  t: number
  desired: number
  ready: number
  starting: number
}

/** Replica counts seen while polling, per deployment: kept while the console is open, across pages. */
const history = new Map<string, Point[]>()

function record(d: Deployment): void {
  const list = history.get(d.id) ?? []
  const t = Date.now() / 1000
  const last = list[list.length - 1]
  // Polls closer than a second apart (two views of the same moment) replace the last point.
  if (last && t - last.t < 1) list.pop()
  list.push({ t, desired: d.status.desired, ready: d.status.ready, starting: d.status.starting })
  if (list.length > MAX_POINTS) list.splice(0, list.length - MAX_POINTS)
  history.set(d.id, list)
}

/** Timeline entries kept, newest last (as the API answers). */
const MAX_EVENTS = 1000

export function DeploymentDetail({ id, onDeleted }: { id: string; onDeleted: (name: string) => void }) {
  const fleet = useFleet()
  const session = useSession()
  const now = useTick(1000)
  const [dep, setDep] = useState<Deployment | null>(null)
  const [points, setPoints] = useState<Point[]>(() => history.get(id) ?? [])
  const [notFound, setNotFound] = useState(false)
  const [events, setEvents] = useState<DeploymentEvent[] | null>(null)
  const [error, setError] = useState<string | null>(null)
  const [confirm, setConfirm] = useState(false)
  const [scaling, setScaling] = useState(false)

  const gone = dep?.state === 'deleted'

  usePoll(
    async (signal) => {
      try {
        const d = await api.deployment(id, signal)
        rememberDeployment(d)
        setDep(d)
        setNotFound(false)
        setError(null)
        if (d.state !== 'deleted') {
          record(d)
          setPoints([...(history.get(id) ?? [])])
        }
      } catch (e) {
        if (e instanceof ApiError && (e.status === 404 || e.status === 400)) setNotFound(true)
        else if (!signal.aborted) setError(e instanceof ApiError ? e.message : String(e))
      }
    },
    gone ? 30000 : POLL_MS,
    [id, gone],
  )

  // The timeline is followed with `after`: only new entries are read once the first page is in.
  const lastEvent = events?.length ? events[events.length - 1].id : undefined
  usePoll(
    async (signal) => {
      try {
        let after = lastEvent
        let fresh: DeploymentEvent[] = []
        for (;;) {
          const t = await api.deploymentEvents(id, { after, limit: MAX_EVENTS }, signal)
          fresh = fresh.concat(t.events)
          if (t.events.length < MAX_EVENTS) break
          after = t.events[t.events.length - 1].id
        }
        setEvents((old) => {
          const all = (old ?? []).concat(fresh.filter((e) => !old?.length || e.id > old[old.length - 1].id))
          return all.length > MAX_EVENTS ? all.slice(all.length - MAX_EVENTS) : all
        })
      } catch (e) {
        if (!signal.aborted && !(e instanceof ApiError && e.status === 404)) setError(e instanceof ApiError ? e.message : String(e))
      }
    },
    gone ? 60000 : 4000,
    [id, gone, lastEvent],
  )

  // Its instances: as the deployment answered, made current by the live stream.
  const instances = useMemo(() => {
    const m = new Map<string, Instance>()
    for (const i of dep?.instances ?? []) m.set(i.id, i)
    for (const i of fleet.instances.values()) {
      if (i.deployment_id !== id) continue
      const old = m.get(i.id)
      if (!old || i.generation >= old.generation) m.set(i.id, i)
    }
    return [...m.values()].sort((a, b) => b.created_at.localeCompare(a.created_at))
  }, [dep, fleet.instances, id])

  const bound = dep?.replicas.max ?? 1
  const chart = useMemo(
    () => ({
      data: [points.map((p) => p.t), points.map((p) => p.desired), points.map((p) => p.ready), points.map((p) => p.starting)] as (number | null)[][],
      // Up to the maximum (or the highest count seen), plus one for headroom.
      top: Math.max(bound, ...points.map((p) => Math.max(p.desired, p.ready, p.starting))) + 1,
    }),
    [points, bound],
  )

  if (notFound && !dep) return <Notice tone="bad">No deployment {id}. It may have been removed.</Notice>
  if (!dep) return error ? <Notice tone="bad">{error} Retrying…</Notice> : <Loading what="the deployment" />

  const metric = SCALING_METRICS.find((m) => m.value === dep.autoscaling.metric)
  const newestFirst = [...(events ?? [])].reverse()

  const remove = async () => {
    setConfirm(false)
    setError(null)
    try {
      const d = await api.deleteDeployment(id)
      setDep((old) => (old && old.generation > d.generation ? old : { ...d, instances: old?.instances }))
      onDeleted(d.name)
    } catch (e) {
      setError(`Could not delete: ${e instanceof ApiError ? e.message : String(e)}`)
    }
  }

  const mayOperate = allows(roleIn(session, dep.project_id ?? session.project ?? 'default'), 'operate')
  return (
    <section aria-labelledby="deployment-title" data-state={dep.state}>
      <p class="crumbs">
        <a href="#/deployments">Deployments</a> / <span class="mono">{id}</span>
      </p>
      <div class="page-head">
        <h1 id="deployment-title">
          {dep.name} <span class="muted">serves</span> {dep.model}
        </h1>
        <div class="head-actions">
          {dep.state === 'active' && mayOperate && (
            <>
              <button type="button" class="btn" aria-expanded={scaling} aria-controls="scale-form" onClick={() => setScaling(!scaling)}>
                Scale
              </button>
              <button type="button" class="btn btn-danger" onClick={() => setConfirm(true)}>
                Delete
              </button>
            </>
          )}
        </div>
      </div>
      {error && <Notice tone="bad">{error}</Notice>}
      {dep.state === 'deleting' && <Notice tone="warn">Being deleted: its replicas drain, then terminate.</Notice>}
      {dep.state === 'deleted' && <Notice>This deployment is deleted: none of its replicas is live. It is kept for its history.</Notice>}
      {scaling && dep.state === 'active' && (
        <ScaleForm
          dep={dep}
          onDone={(d) => {
            setScaling(false)
            if (d) setDep((old) => ({ ...d, instances: old?.instances }))
          }}
        />
      )}

      <div class="card summary-card">
        <dl class="summary-grid">
          <div>
            <dt>State</dt>
            <dd data-testid="deployment-state">
              <DeploymentStateBadge state={dep.state} />
            </dd>
          </div>
          <div>
            <dt>Replicas</dt>
            <dd data-testid="deployment-replicas" data-desired={dep.status.desired} data-ready={dep.status.ready}>
              <strong>{dep.status.ready}</strong> of {dep.status.desired} ready
              <span class="muted small block">
                {dep.status.starting} starting · {dep.status.unhealthy} unhealthy · {dep.status.draining} draining
              </span>
            </dd>
          </div>
          <div>
            <dt>Bounds</dt>
            <dd data-testid="deployment-bounds">
              {dep.replicas.min} to {dep.replicas.max} replicas
            </dd>
          </div>
          <div>
            <dt>Autoscaling</dt>
            <dd>
              {metric?.label ?? dep.autoscaling.metric}, target {dep.autoscaling.target_per_replica} per replica
              <span class="muted small block">scale down after {dep.autoscaling.scale_down_delay} of lower load</span>
            </dd>
          </div>
          <div>
            <dt>Scale to zero</dt>
            <dd>{dep.scale_to_zero_after ? `after ${dep.scale_to_zero_after} (not acted upon yet)` : 'off'}</dd>
          </div>
          <div>
            <dt>Placements, in order</dt>
            <dd>
              <ol class="placement-list" data-testid="deployment-placements">
                {dep.placements.map((p) => (
                  <li class="mono small">{placementText(p)}</li>
                ))}
              </ol>
            </dd>
          </div>
          {dep.engine_args?.length ? (
            <div>
              <dt>Engine arguments</dt>
              <dd class="mono small">{dep.engine_args.join(' ')}</dd>
            </div>
          ) : null}
          <div>
            <dt>Created</dt>
            <dd>
              {dateTime(dep.created_at)} <span class="muted small">· {ago(dep.created_at, now)}</span>
            </dd>
          </div>
          <div>
            <dt>Updated</dt>
            <dd>
              {dateTime(dep.updated_at)} <span class="muted small">· generation {dep.generation}</span>
            </dd>
          </div>
          {dep.deleted_at && (
            <div>
              <dt>Deleted</dt>
              <dd>{dateTime(dep.deleted_at)}</dd>
            </div>
          )}
        </dl>
        <div class="status-message" data-testid="deployment-conditions">
          <strong>{dep.status.summary || 'No status yet.'}</strong>
          {dep.status.conditions.length > 0 && (
            <ul class="plain conditions">
              {dep.status.conditions.map((c) => (
                <li>{c}</li>
              ))}
            </ul>
          )}
        </div>
      </div>

      <h2 id="replicas-chart-title">Replicas over time</h2>
      <p class="muted small chart-note">
        Read every {POLL_MS / 1000} s while this page is open{points.length ? `, since ${time(new Date(points[0].t * 1000).toISOString())}` : ''}.
      </p>
      <div class="chart-grid" aria-labelledby="replicas-chart-title" data-testid="replicas-chart">
        {points.length < 2 ? (
          <p class="muted">Collecting points…</p>
        ) : (
          <Chart
            title="Desired and ready replicas"
            series={[{ label: 'Desired' }, { label: 'Ready' }, { label: 'Starting' }]}
            data={chart.data}
            // Replicas are whole: ticks between them carry no label.
            fmt={(v) => (Number.isInteger(v) ? String(v) : '')}
            yRange={[0, chart.top]}
            height={160}
          />
        )}
      </div>

      <h2 id="deployment-instances-title">Instances</h2>
      {instances.length === 0 ? (
        <p class="muted" data-testid="deployment-instances">
          {dep.state === 'active' ? 'No replica yet: the keeper starts them shortly.' : 'No instance left.'}
        </p>
      ) : (
        <div class="table-wrap">
          <table class="table cards" aria-labelledby="deployment-instances-title" data-testid="deployment-instances">
            <thead>
              <tr>
                <th scope="col">Instance</th>
                <th scope="col">Status</th>
                <th scope="col">Placement</th>
                <th scope="col">IP</th>
                <th scope="col">Created</th>
              </tr>
            </thead>
            <tbody>
              {instances.map((i) => (
                <tr key={i.id} data-id={i.id} data-status={i.status}>
                  <td data-label="Instance">
                    <a href={`#/instances/${i.id}`} class="mono" title={i.id}>
                      {shortId(i.id)}
                    </a>
                  </td>
                  <td data-label="Status">
                    <StatusCell i={i} />
                  </td>
                  <td data-label="Placement">
                    <span class="mono small">{placementText(i)}</span>
                  </td>
                  <td class="mono" data-label="IP">
                    {i.ip ?? <span class="muted">—</span>}
                  </td>
                  <td data-label="Created">
                    <span title={dateTime(i.created_at)}>{ago(i.created_at, now)}</span>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}

      <h2 id="timeline-title">Timeline</h2>
      {!events ? (
        <Loading what="the timeline" />
      ) : newestFirst.length === 0 ? (
        <Empty title="No decisions yet." />
      ) : (
        <ol class="timeline" aria-labelledby="timeline-title" data-testid="deployment-timeline">
          {newestFirst.map((e) => (
            <li key={e.id} class={`tl tl-${e.outcome}`} data-action={e.action} data-outcome={e.outcome}>
              <span class="tl-dot" aria-hidden="true" />
              <div class="tl-main">
                <div class="tl-head">
                  <span class="tl-action">{e.action.replace(/_/g, ' ')}</span>
                  <span class={`tl-outcome o-${e.outcome}`}>{e.outcome.replace(/_/g, ' ')}</span>
                </div>
                {e.message && <p class="tl-msg">{e.message}</p>}
              </div>
              <time class="tl-time" dateTime={e.at} title={dateTime(e.at)}>
                {time(e.at)} <span class="muted">{shortDuration(Math.max(0, now - Date.parse(e.at)))} ago</span>
              </time>
            </li>
          ))}
        </ol>
      )}

      <Confirm open={confirm} title="Delete this deployment?" confirmLabel="Delete" onCancel={() => setConfirm(false)} onConfirm={remove}>
        <p>
          <strong>{dep.name}</strong> stops being kept: its {instances.filter((i) => i.status !== 'terminated').length || 'no'} live replica
          {instances.filter((i) => i.status !== 'terminated').length === 1 ? '' : 's'} drain, then terminate. This cannot be undone.
        </p>
      </Confirm>
    </section>
  )
}

/** Change the replica bounds (PATCH); the API's field errors are shown next to the fields. */
function ScaleForm({ dep, onDone }: { dep: Deployment; onDone: (d: Deployment | null) => void }) {
  const [min, setMin] = useState(String(dep.replicas.min))
  const [max, setMax] = useState(String(dep.replicas.max))
  const [errors, setErrors] = useState<FieldErrors>({})
  const [formError, setFormError] = useState<string | null>(null)
  const [busy, setBusy] = useState(false)
  const int = (v: string) => (v.trim() !== '' && Number.isFinite(Number(v)) ? Number(v) : null)

  const submit = async (e: Event) => {
    e.preventDefault()
    const local: FieldErrors = {}
    const minN = int(min)
    const maxN = int(max)
    if (minN === null) local['replicas.min'] = 'Enter a number.'
    if (maxN === null) local['replicas.max'] = 'Enter a number.'
    setErrors(local)
    setFormError(null)
    if (Object.keys(local).length) return
    setBusy(true)
    try {
      onDone(await api.patchDeployment(dep.id, { replicas: { min: minN!, max: maxN! } }))
    } catch (err) {
      if (err instanceof ApiError && err.field && document.getElementById(fieldId(err.field))) setErrors({ [err.field]: err.message })
      else setFormError(err instanceof ApiError ? err.message : String(err))
    } finally {
      setBusy(false)
    }
  }

  return (
    <form id="scale-form" class="card form scale-form" onSubmit={submit} noValidate aria-labelledby="scale-title" data-testid="scale-form">
      <h2 id="scale-title">Scale</h2>
      <p class="help">Replicas stay within these bounds; autoscaling chooses inside them. A lower count takes effect after the scale-down delay.</p>
      {formError && <Notice tone="bad">{formError}</Notice>}
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
      <div class="form-actions">
        <button type="submit" class="btn btn-primary" disabled={busy}>
          {busy ? 'Saving…' : 'Apply'}
        </button>
        <button type="button" class="btn" onClick={() => onDone(null)}>
          Cancel
        </button>
      </div>
    </form>
  )
}
