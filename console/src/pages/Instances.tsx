import { useMemo, useState } from 'preact/hooks'
import { api, ApiError, TERMINABLE, type Instance } from '../api'
import { Confirm, Empty, Loading, Notice, StatusCell } from '../components/ui'
import { costSoFar, duration, money, shortId, uptime } from '../format'
import { allows, canHere, roleIn, useSession } from '../session'
import { upsert, useCatalog, useDeploymentNames, useFleet, useInProject, useTick, type Catalog } from '../store'

type Group = 'all' | 'running' | 'starting' | 'problems' | 'stopped'

const GROUPS: Record<Group, { label: string; match: (i: Instance) => boolean }> = {
  all: { label: 'All', match: () => true },
  running: { label: 'Ready', match: (i) => i.status === 'ready' },
  starting: { label: 'Starting', match: (i) => ['provisioning', 'booting', 'starting'].includes(i.status) },
  problems: { label: 'Problems', match: (i) => ['failed', 'unhealthy'].includes(i.status) },
  stopped: { label: 'Stopped', match: (i) => ['draining', 'terminating', 'terminated'].includes(i.status) },
}

export function Instances({ flash }: { flash?: string | null }) {
  const fleet = useFleet()
  const session = useSession()
  const inProject = useInProject(session.project)
  const mayCreate = canHere(session, 'operate')
  const mayOperate = (i: Instance) => allows(roleIn(session, i.project_id ?? session.project ?? 'default'), 'operate')
  const catalog = useCatalog()
  const now = useTick(1000)
  const [group, setGroup] = useState<Group>('all')
  const [model, setModel] = useState('')
  const [provider, setProvider] = useState('')
  const [text, setText] = useState('')
  const [selected, setSelected] = useState<Set<string>>(new Set())
  const [confirm, setConfirm] = useState<Instance[] | null>(null)
  const [error, setError] = useState<string | null>(null)

  const all = useMemo(
    () => [...fleet.instances.values()].filter(inProject).sort((a, b) => b.created_at.localeCompare(a.created_at)),
    [fleet.instances, inProject],
  )
  const deploymentNames = useDeploymentNames(all.map((i) => i.deployment_id))
  const models = [...new Set(all.map((i) => i.model))].sort()
  const providers = [...new Set(all.map((i) => i.provider))].sort()
  const q = text.trim().toLowerCase()
  const rows = all.filter(
    (i) =>
      GROUPS[group].match(i) &&
      (!model || i.model === model) &&
      (!provider || i.provider === provider) &&
      (!q || i.id.includes(q) || (i.ip ?? '').includes(q) || i.zone.includes(q) || i.instance_type.toLowerCase().includes(q)),
  )
  const selectable = rows.filter((i) => TERMINABLE.includes(i.status) && mayOperate(i))
  const chosen = selectable.filter((i) => selected.has(i.id))

  const toggle = (id: string) => {
    const s = new Set(selected)
    if (s.has(id)) s.delete(id)
    else s.add(id)
    setSelected(s)
  }
  const toggleAll = () => setSelected(chosen.length === selectable.length ? new Set() : new Set(selectable.map((i) => i.id)))

  const terminate = async (list: Instance[]) => {
    setConfirm(null)
    setError(null)
    const failures: string[] = []
    await Promise.all(
      list.map(async (i) => {
        try {
          const v = (await api.terminate(i.id)) as Instance | undefined
          if (v && typeof v === 'object' && 'id' in v) upsert(v)
        } catch (e) {
          failures.push(`${shortId(i.id)}: ${e instanceof ApiError ? e.message : String(e)}`)
        }
      }),
    )
    setSelected(new Set())
    if (failures.length) setError(`Could not terminate ${failures.join('; ')}`)
  }

  const archive = async (i: Instance) => {
    setError(null)
    try {
      const v = (await api.archive(i.id)) as Instance | undefined
      upsert(v && typeof v === 'object' && 'id' in v ? v : { ...i, status: 'archived' })
    } catch (e) {
      setError(`Could not archive ${shortId(i.id)}: ${e instanceof ApiError ? e.message : String(e)}`)
    }
  }

  return (
    <section aria-labelledby="instances-title">
      <div class="page-head">
        <h1 id="instances-title">Instances</h1>
        {mayCreate && (
          <a class="btn btn-primary" href="#/instances/new">
            Create instances
          </a>
        )}
      </div>
      {session.project && (
        <p class="muted small" data-testid="project-scope">
          Project {session.project} only. Choose “All projects” in the header to see every instance you may.
        </p>
      )}
      {flash && <Notice>{flash}</Notice>}
      {error && <Notice tone="bad">{error}</Notice>}

      <div class="toolbar" role="group" aria-label="Filters">
        <div class="segmented" role="radiogroup" aria-label="Status">
          {(Object.keys(GROUPS) as Group[]).map((g) => {
            const n = all.filter(GROUPS[g].match).length
            return (
              <button type="button" role="radio" aria-checked={group === g} class={group === g ? 'seg on' : 'seg'} onClick={() => setGroup(g)}>
                {GROUPS[g].label} <span class="count">{n}</span>
              </button>
            )
          })}
        </div>
        <label class="inline">
          Provider
          <select value={provider} onChange={(e) => setProvider(e.currentTarget.value)}>
            <option value="">All</option>
            {providers.map((p) => (
              <option value={p}>{p}</option>
            ))}
          </select>
        </label>
        <label class="inline">
          Model
          <select value={model} onChange={(e) => setModel(e.currentTarget.value)}>
            <option value="">All</option>
            {models.map((m) => (
              <option value={m}>{m}</option>
            ))}
          </select>
        </label>
        <label class="inline grow">
          Search
          <input type="search" placeholder="id, IP, zone, type" value={text} onInput={(e) => setText(e.currentTarget.value)} />
        </label>
        {mayCreate && (
          <button type="button" class="btn btn-danger" disabled={!chosen.length} onClick={() => setConfirm(chosen)}>
            Terminate selected{chosen.length ? ` (${chosen.length})` : ''}
          </button>
        )}
      </div>

      {!fleet.loaded ? (
        fleet.error ? (
          <Notice tone="bad">{fleet.error.message} Retrying…</Notice>
        ) : (
          <Loading what="instances" />
        )
      ) : all.length === 0 ? (
        <Empty title="No instances yet.">
          {mayCreate && (
            <p>
              <a href="#/instances/new">Create your first instances</a> to serve a model.
            </p>
          )}
        </Empty>
      ) : rows.length === 0 ? (
        <Empty title="No instance matches these filters." />
      ) : (
        <div class="table-wrap">
          <table class="table cards" aria-label="Instances">
            <thead>
              <tr>
                <th scope="col" class="check">
                  <input
                    type="checkbox"
                    aria-label="Select all terminable instances"
                    checked={selectable.length > 0 && chosen.length === selectable.length}
                    disabled={!selectable.length}
                    onChange={toggleAll}
                  />
                </th>
                <th scope="col">Instance</th>
                <th scope="col">Status</th>
                <th scope="col">Provider / zone</th>
                <th scope="col">Type</th>
                <th scope="col">Model</th>
                <th scope="col">IP</th>
                <th scope="col" class="num">Uptime</th>
                <th scope="col" class="num">Cost so far</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {rows.map((i) => (
                <Row
                  key={i.id}
                  i={i}
                  now={now}
                  catalog={catalog}
                  deployment={i.deployment_id ? (deploymentNames.get(i.deployment_id) ?? shortId(i.deployment_id)) : null}
                  mayOperate={mayOperate(i)}
                  selected={selected.has(i.id)}
                  onToggle={() => toggle(i.id)}
                  onTerminate={() => setConfirm([i])}
                  onArchive={() => archive(i)}
                />
              ))}
            </tbody>
          </table>
        </div>
      )}

      <Confirm
        open={!!confirm}
        title={confirm && confirm.length > 1 ? `Terminate ${confirm.length} instances?` : 'Terminate this instance?'}
        confirmLabel="Terminate"
        onCancel={() => setConfirm(null)}
        onConfirm={() => confirm && terminate(confirm)}
      >
        <p>The machines are deleted at the provider. This cannot be undone.</p>
        <ul class="plain">
          {confirm?.map((i) => (
            <li>
              <code>{i.id}</code> · {i.instance_type} · {i.model}
            </li>
          ))}
        </ul>
      </Confirm>
    </section>
  )
}

interface RowProps {
  i: Instance
  now: number
  catalog: Catalog | null
  /** The name of the deployment it is a replica of. */
  deployment: string | null
  /** The caller's role in its project allows terminate and archive. */
  mayOperate: boolean
  selected: boolean
  onToggle: () => void
  onTerminate: () => void
  onArchive: () => void
}

function Row({ i, now, catalog, deployment, mayOperate, selected, onToggle, onTerminate, onArchive }: RowProps) {
  const type = catalog?.get(`${i.provider}/${i.instance_type}`)
  const cost = costSoFar(i, type, now)
  const up = uptime(i, now)
  const terminable = TERMINABLE.includes(i.status) && mayOperate
  return (
    <tr data-id={i.id} data-status={i.status}>
      <td class="check" data-label="Select">
        <input type="checkbox" aria-label={`Select ${i.id}`} checked={selected} disabled={!terminable} onChange={onToggle} />
      </td>
      <td data-label="Instance">
        <a href={`#/instances/${i.id}`} class="mono" title={i.id}>
          {shortId(i.id)}
        </a>
      </td>
      <td data-label="Status">
        <StatusCell i={i} />
      </td>
      <td data-label="Provider / zone">
        <span>
          {i.provider} <span class="muted">/ {i.zone}</span>
        </span>
      </td>
      <td data-label="Type">
        <span>
          {i.instance_type}
          {type && (
            <span class="muted small block">
              {type.gpu.count}× {type.gpu.model}
            </span>
          )}
        </span>
      </td>
      <td data-label="Model">
        <span>
          {i.model}
          {i.deployment_id && (
            <a class="small block" href={`#/deployments/${i.deployment_id}`} title={`Replica of deployment ${i.deployment_id}`} data-testid="instance-deployment">
              <span class="sr-only">Deployment </span>
              {deployment}
            </a>
          )}
        </span>
      </td>
      <td class="mono" data-label="IP">{i.ip ?? <span class="muted">—</span>}</td>
      <td class="num" data-label="Uptime">{up === null ? <span class="muted">—</span> : duration(up)}</td>
      <td class="num" data-label="Cost so far">{cost === null ? <span class="muted">—</span> : money(cost, type?.currency ?? 'EUR')}</td>
      <td class="actions" data-label="">
        {terminable && (
          <button type="button" class="btn btn-small btn-danger-outline" onClick={onTerminate} aria-label={`Terminate ${i.id}`}>
            Terminate
          </button>
        )}
        {i.status === 'terminated' && mayOperate && (
          <button type="button" class="btn btn-small" onClick={onArchive} aria-label={`Archive ${i.id}`}>
            Archive
          </button>
        )}
      </td>
    </tr>
  )
}
