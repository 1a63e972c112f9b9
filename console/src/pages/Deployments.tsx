import { useState } from 'preact/hooks'
import { api, ApiError, type Deployment, type DeploymentState } from '../api'
import { Empty, Loading, Notice } from '../components/ui'
import { ago, dateTime } from '../format'
import { canHere, useSession } from '../session'
import { rememberDeployment, usePoll, useTick } from '../store'

const STATE_TONE: Record<DeploymentState, string> = { active: 'ok', deleting: 'warn', deleted: 'muted' }

export function DeploymentStateBadge({ state }: { state: DeploymentState }) {
  return (
    <span class={`badge badge-${STATE_TONE[state] ?? 'muted'}`} data-state={state}>
      {state}
    </span>
  )
}

/** `provider/zone/type`, as the API writes a placement. */
export function placementText(p: { provider: string; zone: string; instance_type: string }): string {
  return `${p.provider}/${p.zone}/${p.instance_type}`
}

export function Deployments({ flash }: { flash?: string | null }) {
  const now = useTick(5000)
  const session = useSession()
  const mayCreate = canHere(session, 'operate')
  const [list, setList] = useState<Deployment[] | null>(null)
  const [error, setError] = useState<string | null>(null)

  usePoll(
    async (signal) => {
      try {
        const l = await api.deployments({ project: session.project }, signal)
        l.deployments.forEach(rememberDeployment)
        setList(l.deployments)
        setError(null)
      } catch (e) {
        if (!signal.aborted) setError(e instanceof ApiError ? e.message : String(e))
      }
    },
    3000,
    [session.project],
  )

  // Newest first, as the instances table.
  const rows = [...(list ?? [])].sort((a, b) => b.created_at.localeCompare(a.created_at))

  return (
    <section aria-labelledby="deployments-title">
      <div class="page-head">
        <h1 id="deployments-title">Deployments</h1>
        {mayCreate && (
          <a class="btn btn-primary" href="#/deployments/new">
            Create deployment
          </a>
        )}
      </div>
      {flash && <Notice>{flash}</Notice>}
      {error && <Notice tone="bad">{list ? `${error} Showing the last known state.` : `${error} Retrying…`}</Notice>}
      <p class="muted small">
        A deployment declares a model's serving once — where it may run, in order, and how many replicas — and the control plane keeps it true:
        it starts, replaces and scales replicas, and records every decision on the deployment's timeline.
      </p>

      {!list ? (
        !error && <Loading what="deployments" />
      ) : rows.length === 0 ? (
        <Empty title="No deployments yet.">
          {mayCreate && (
            <p>
              <a href="#/deployments/new">Create a deployment</a> to keep a model served.
            </p>
          )}
        </Empty>
      ) : (
        <div class="table-wrap">
          <table class="table cards" aria-label="Deployments" data-testid="deployments">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Model</th>
                <th scope="col">State</th>
                <th scope="col" class="num">
                  Desired
                </th>
                <th scope="col" class="num">
                  Ready
                </th>
                <th scope="col" class="num">
                  Starting
                </th>
                <th scope="col" class="num">
                  Draining
                </th>
                <th scope="col">Conditions</th>
                <th scope="col">Created</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((d) => (
                <tr key={d.id} data-id={d.id} data-name={d.name} data-state={d.state}>
                  <td data-label="Name">
                    <a href={`#/deployments/${d.id}`} title={d.id}>
                      {d.name}
                    </a>
                  </td>
                  <td data-label="Model">{d.model}</td>
                  <td data-label="State">
                    <DeploymentStateBadge state={d.state} />
                  </td>
                  <td class="num" data-label="Desired" data-col="desired">
                    {d.status.desired}
                    <span class="muted small block">
                      {d.replicas.min}–{d.replicas.max}
                    </span>
                  </td>
                  <td class="num" data-label="Ready" data-col="ready">
                    {d.status.ready}
                  </td>
                  <td class="num" data-label="Starting" data-col="starting">
                    {d.status.starting}
                  </td>
                  <td class="num" data-label="Draining" data-col="draining">
                    {d.status.draining}
                  </td>
                  <td data-label="Conditions" data-col="conditions">
                    <span>
                      {d.status.summary || <span class="muted">—</span>}
                      {d.status.conditions.map((c) => (
                        <span class="muted small block">{c}</span>
                      ))}
                    </span>
                  </td>
                  <td data-label="Created">
                    <span title={dateTime(d.created_at)}>{ago(d.created_at, now)}</span>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  )
}
