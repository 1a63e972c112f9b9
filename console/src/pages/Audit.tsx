import { useEffect, useState } from 'preact/hooks'
import { api, type AuditEntry, type AuditFilter } from '../api'
import { Empty, errorText, Loading, Notice } from '../components/ui'
import { dateTime } from '../format'
import { useSession } from '../session'

const PAGE_SIZES = [10, 50, 100, 500]

interface Filters {
  actor: string
  action: string
  target: string
  outcome: string
  project: string
  from: string
  to: string
  limit: string
}

/** A `datetime-local` value (local time) as RFC 3339. */
function rfc3339(local: string): string | undefined {
  if (!local) return undefined
  const t = new Date(local)
  return Number.isNaN(t.getTime()) ? undefined : t.toISOString()
}

const OUTCOME_TONE: Record<string, string> = { success: 'ok', denied: 'warn', failure: 'bad' }

export function Audit() {
  const s = useSession()
  const blank: Filters = { actor: '', action: '', target: '', outcome: '', project: s.project ?? '', from: '', to: '', limit: '50' }
  const [draft, setDraft] = useState<Filters>(blank)
  const [applied, setApplied] = useState<Filters>(blank)
  const [entries, setEntries] = useState<AuditEntry[] | null>(null)
  const [next, setNext] = useState<number | null>(null)
  const [error, setError] = useState<string | null>(null)
  const [loadingMore, setLoadingMore] = useState(false)

  // The header's project is the default filter.
  useEffect(() => {
    setDraft((d) => ({ ...d, project: s.project ?? '' }))
    setApplied((a) => ({ ...a, project: s.project ?? '' }))
  }, [s.project])

  const query = (f: Filters, before?: number): AuditFilter => ({
    actor: f.actor.trim() || undefined,
    action: f.action.trim() || undefined,
    target: f.target.trim() || undefined,
    outcome: f.outcome || undefined,
    project: f.project || undefined,
    from: rfc3339(f.from),
    to: rfc3339(f.to),
    limit: Number(f.limit) || 50,
    before,
  })

  useEffect(() => {
    const ctrl = new AbortController()
    setEntries(null)
    setError(null)
    api.audit(query(applied), ctrl.signal).then(
      (p) => {
        setEntries(p.entries)
        setNext(p.next_before)
      },
      (e) => {
        if (ctrl.signal.aborted) return
        setEntries([])
        setNext(null)
        setError(errorText(e))
      },
    )
    return () => ctrl.abort()
  }, [JSON.stringify(applied)])

  const older = async () => {
    if (next === null) return
    setLoadingMore(true)
    try {
      const p = await api.audit(query(applied, next))
      setEntries([...(entries ?? []), ...p.entries])
      setNext(p.next_before)
    } catch (e) {
      setError(errorText(e))
    } finally {
      setLoadingMore(false)
    }
  }

  const input = (f: keyof Filters, label: string, placeholder?: string, type = 'text') => (
    <label class="inline">
      {label}
      <input type={type} value={draft[f]} placeholder={placeholder} onInput={(e) => setDraft({ ...draft, [f]: e.currentTarget.value })} />
    </label>
  )

  return (
    <section aria-labelledby="audit-title">
      <div class="page-head">
        <h1 id="audit-title">Audit log</h1>
      </div>
      <p class="muted">
        Who did what, newest first: every change, every sign-in, every refusal. {s.me?.kind === 'user' ? 'You see the projects you are an admin of, and the entries about you: your sign-ins (refused ones too) and access tokens.' : null}
      </p>
      <form
        class="toolbar audit-filters"
        role="search"
        aria-label="Audit filters"
        onSubmit={(e) => {
          e.preventDefault()
          setApplied(draft)
        }}
      >
        {input('actor', 'Actor', 'email, user id, admin token')}
        {input('action', 'Action', 'instance. or auth.sign_in')}
        {input('target', 'Target', 'an id')}
        <label class="inline">
          Outcome
          <select value={draft.outcome} onChange={(e) => setDraft({ ...draft, outcome: e.currentTarget.value })}>
            <option value="">Any</option>
            <option value="success">success</option>
            <option value="denied">denied</option>
            <option value="failure">failure</option>
          </select>
        </label>
        <label class="inline">
          Project
          <select value={draft.project} onChange={(e) => setDraft({ ...draft, project: e.currentTarget.value })}>
            <option value="">All</option>
            {(s.projects ?? []).map((p) => (
              <option value={p.id}>{p.id}</option>
            ))}
          </select>
        </label>
        <label class="inline">
          Per page
          <select value={draft.limit} onChange={(e) => setDraft({ ...draft, limit: e.currentTarget.value })}>
            {PAGE_SIZES.map((n) => (
              <option value={String(n)}>{n}</option>
            ))}
          </select>
        </label>
        {input('from', 'From', undefined, 'datetime-local')}
        {input('to', 'To', undefined, 'datetime-local')}
        <button type="submit" class="btn btn-primary">
          Apply filters
        </button>
        <button
          type="button"
          class="btn"
          onClick={() => {
            setDraft(blank)
            setApplied(blank)
          }}
        >
          Clear
        </button>
      </form>
      {error && <Notice tone="bad">{error}</Notice>}
      {!entries ? (
        <Loading what="the audit log" />
      ) : entries.length === 0 ? (
        error ? null : <Empty title="No entries match these filters." />
      ) : (
        <>
          <div class="table-wrap">
            <table class="table cards" aria-label="Audit log">
              <thead>
                <tr>
                  <th scope="col">Time</th>
                  <th scope="col">Actor</th>
                  <th scope="col">Action</th>
                  <th scope="col">Target</th>
                  <th scope="col">Project</th>
                  <th scope="col">Outcome</th>
                  <th scope="col" class="num">Status</th>
                  <th scope="col">Message</th>
                </tr>
              </thead>
              <tbody>
                {entries.map((e) => (
                  <tr data-id={e.id} data-action={e.action} data-outcome={e.outcome}>
                    <td data-label="Time" class="nowrap">
                      {dateTime(e.at)}
                    </td>
                    <td data-label="Actor">
                      <span title={e.actor.id ?? e.actor.kind}>{e.actor.name}</span>
                      {e.source_ip && <span class="muted small block">{e.source_ip}</span>}
                    </td>
                    <td data-label="Action" class="mono">
                      {e.action}
                    </td>
                    <td data-label="Target">
                      <span>
                        {e.target.kind}
                        {e.target.id && <span class="mono small block">{e.target.id}</span>}
                      </span>
                    </td>
                    <td data-label="Project">{e.project_id ?? <span class="muted">—</span>}</td>
                    <td data-label="Outcome">
                      <span class={`badge badge-${OUTCOME_TONE[e.outcome] ?? 'muted'}`}>{e.outcome}</span>
                    </td>
                    <td data-label="Status" class="num">
                      {e.status}
                    </td>
                    <td data-label="Message" class="wrap">
                      {e.message}
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          <div class="pager">
            {next !== null ? (
              <button type="button" class="btn" onClick={older} disabled={loadingMore}>
                {loadingMore ? 'Loading…' : 'Show older entries'}
              </button>
            ) : (
              <span class="muted small">The oldest entry is shown.</span>
            )}
          </div>
        </>
      )}
    </section>
  )
}
