// The project a create form sends ("project"), among those where the caller may.

import { useEffect } from 'preact/hooks'
import { isAdminToken, projectsAllowing, useSession, type Permission } from '../session'

export interface ProjectFieldProps {
  id: string
  value: string
  onChange: (v: string) => void
  need: Permission
  error?: string
}

/** A select of the caller's projects that allow `need`, defaulting to the header's project. */
export function ProjectField({ id, value, onChange, need, error }: ProjectFieldProps) {
  const s = useSession()
  const options = projectsAllowing(s, need)
  useEffect(() => {
    if (value) return
    // The header's project; else the only one; else, for the admin token, `default` (the server's own default).
    const has = (id: string | null) => !!id && options.some((p) => p.id === id)
    const preferred = has(s.project) ? s.project : options.length === 1 ? options[0].id : isAdminToken(s) && has('default') ? 'default' : ''
    if (preferred) onChange(preferred)
  }, [s.project, options.map((p) => p.id).join(',')])
  return (
    <div class="field">
      <label for={id}>Project</label>
      <select id={id} value={value} onChange={(e) => onChange(e.currentTarget.value)} aria-invalid={error ? 'true' : undefined} aria-describedby={`${id}-help${error ? ` ${id}-error` : ''}`}>
        {options.length !== 1 && <option value="">Choose a project…</option>}
        {options.map((p) => (
          <option value={p.id}>
            {p.id} ({p.role})
          </option>
        ))}
      </select>
      <p id={`${id}-help`} class="help">
        {options.length ? 'It belongs to this project: its members see it, its roles decide who may change it.' : 'None of your projects allows this; ask a project admin for a role.'}
      </p>
      {error && (
        <p id={`${id}-error`} class="field-error" role="alert">
          {error}
        </p>
      )}
    </div>
  )
}
