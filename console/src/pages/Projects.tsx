import { useEffect, useState } from 'preact/hooks'
import { api, ApiError, ROLES, type Member, type Project, type Role, type User } from '../api'
import { Confirm, Empty, errorText, Loading, Notice } from '../components/ui'
import { dateTime } from '../format'
import { allows, isAdminToken, loadSession, useSession } from '../session'

const PROJECT_ID = /^[a-z0-9][a-z0-9-]{0,38}$/

export function Projects() {
  const s = useSession()
  const [error, setError] = useState<string | null>(null)
  const [newId, setNewId] = useState('')
  const [idError, setIdError] = useState<string | null>(null)
  const [flash, setFlash] = useState<string | null>(null)
  const [users, setUsers] = useState<User[] | null>(null)
  const adminToken = isAdminToken(s)
  const manageSomewhere = adminToken || (s.projects ?? []).some((p) => allows(p.role, 'manage_members'))

  // Users to grant roles to: project admins and the admin token may list them.
  const loadUsers = () => {
    if (!manageSomewhere) return
    api.users().then(setUsers, (e) => setError(errorText(e)))
  }
  useEffect(loadUsers, [manageSomewhere])

  const createProject = async (e: Event) => {
    e.preventDefault()
    const id = newId.trim()
    if (!PROJECT_ID.test(id)) {
      setIdError('Lower-case letters, digits and dashes, starting with a letter or digit (at most 39).')
      return
    }
    setIdError(null)
    try {
      await api.createProject(id)
      setNewId('')
      setFlash(`Project ${id} created.`)
      await loadSession()
    } catch (err) {
      setIdError(errorText(err))
    }
  }

  const shown = (s.projects ?? []).filter((p) => !s.project || p.id === s.project)
  return (
    <section aria-labelledby="projects-title">
      <div class="page-head">
        <h1 id="projects-title">Projects</h1>
      </div>
      <p class="muted">Who may do what: a role per project. Viewers look; operators run instances, deployments and keys; admins also manage members.</p>
      {flash && <Notice>{flash}</Notice>}
      {error && <Notice tone="bad">{error}</Notice>}

      {adminToken && (
        <>
          <form class="card form inline-form" onSubmit={createProject} noValidate aria-labelledby="new-project-title">
            <h2 id="new-project-title">New project</h2>
            <div class="field">
              <label for="project-id">Project id</label>
              <input id="project-id" value={newId} placeholder="research" onInput={(e) => setNewId(e.currentTarget.value)} aria-invalid={idError ? 'true' : undefined} aria-describedby={`project-id-help${idError ? ' project-id-error' : ''}`} />
              <p id="project-id-help" class="help">
                It is also the name: lower-case letters, digits and dashes.
              </p>
              {idError && (
                <p id="project-id-error" class="field-error" role="alert">
                  {idError}
                </p>
              )}
            </div>
            <div class="form-actions">
              <button type="submit" class="btn btn-primary">
                Create project
              </button>
            </div>
          </form>
          <NewUser
            onCreated={(u) => {
              setFlash(`User ${u.email} created. Grant them a role below.`)
              loadUsers()
            }}
          />
        </>
      )}

      {!s.projects ? (
        <Loading what="projects" />
      ) : shown.length === 0 ? (
        <Empty title="You have no role in any project yet.">
          <p>Ask a project admin to grant you one.</p>
        </Empty>
      ) : (
        shown.map((p) => <ProjectCard key={p.id} project={p} users={users} />)
      )}
    </section>
  )
}

function NewUser({ onCreated }: { onCreated: (u: User) => void }) {
  const [email, setEmail] = useState('')
  const [name, setName] = useState('')
  const [password, setPassword] = useState('')
  const [error, setError] = useState<string | null>(null)
  const submit = async (e: Event) => {
    e.preventDefault()
    if (!email.trim() || !name.trim()) {
      setError('Email and name are needed.')
      return
    }
    setError(null)
    try {
      const u = await api.createUser({ email: email.trim(), display_name: name.trim(), ...(password ? { password } : {}) })
      setEmail('')
      setName('')
      setPassword('')
      onCreated(u)
    } catch (err) {
      setError(errorText(err))
    }
  }
  return (
    <form class="card form inline-form" onSubmit={submit} noValidate aria-labelledby="new-user-title">
      <h2 id="new-user-title">New user</h2>
      <div class="field-row">
        <div class="field">
          <label for="user-email">Email</label>
          <input id="user-email" type="email" value={email} onInput={(e) => setEmail(e.currentTarget.value)} />
        </div>
        <div class="field">
          <label for="user-name">Display name</label>
          <input id="user-name" value={name} onInput={(e) => setName(e.currentTarget.value)} />
        </div>
        <div class="field">
          <label for="user-password">Password (optional)</label>
          <input id="user-password" type="password" autocomplete="new-password" value={password} onInput={(e) => setPassword(e.currentTarget.value)} aria-describedby="user-password-help" />
          <p id="user-password-help" class="help">
            At least 12 characters; empty: single sign-on only (linked by email).
          </p>
        </div>
      </div>
      {error && (
        <p class="field-error" role="alert">
          {error}
        </p>
      )}
      <div class="form-actions">
        <button type="submit" class="btn">
          Create user
        </button>
      </div>
    </form>
  )
}

function ProjectCard({ project, users }: { project: Project; users: User[] | null }) {
  const s = useSession()
  const [members, setMembers] = useState<Member[] | null>(null)
  const [error, setError] = useState<string | null>(null)
  const [userId, setUserId] = useState('')
  const [role, setRole] = useState<Role>('viewer')
  const [confirm, setConfirm] = useState<Member | null>(null)
  const [reload, setReload] = useState(0)
  const manage = allows(project.role, 'manage_members')
  const myId = s.me?.user?.id

  useEffect(() => {
    const ctrl = new AbortController()
    api.members(project.id, ctrl.signal).then(setMembers, (e) => !ctrl.signal.aborted && setError(errorText(e)))
    return () => ctrl.abort()
  }, [project.id, reload])

  const grant = async (uid: string, r: Role) => {
    setError(null)
    try {
      await api.grant(project.id, uid, r)
      setReload((n) => n + 1)
      if (uid === myId) await loadSession()
    } catch (e) {
      setError(e instanceof ApiError ? e.message : String(e))
    }
  }
  const revoke = async (m: Member) => {
    setConfirm(null)
    setError(null)
    try {
      await api.revokeMember(project.id, m.user.id)
      setReload((n) => n + 1)
      if (m.user.id === myId) await loadSession()
    } catch (e) {
      setError(errorText(e))
    }
  }

  const candidates = (users ?? []).filter((u) => !(members ?? []).some((m) => m.user.id === u.id))
  return (
    <article class="card project-card" aria-labelledby={`project-${project.id}`} data-project={project.id}>
      <div class="section-head">
        <h2 id={`project-${project.id}`}>{project.id}</h2>
        <span class="muted small">
          your role: <strong>{project.role}</strong> · created {dateTime(project.created_at)}
        </span>
      </div>
      {error && <Notice tone="bad">{error}</Notice>}
      {!members ? (
        <Loading what="members" />
      ) : members.length === 0 ? (
        <p class="muted">No members yet.</p>
      ) : (
        <div class="table-wrap">
          <table class="table cards" aria-label={`Members of ${project.id}`}>
            <thead>
              <tr>
                <th scope="col">User</th>
                <th scope="col">Role</th>
                <th scope="col">Granted by</th>
                <th scope="col">Granted at</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {members.map((m) => (
                <tr data-user={m.user.email}>
                  <td data-label="User">
                    <span>
                      {m.user.display_name} <span class="muted small block">{m.user.email}</span>
                    </span>
                  </td>
                  <td data-label="Role">
                    {manage ? (
                      <select aria-label={`Role of ${m.user.email}`} value={m.role} onChange={(e) => grant(m.user.id, e.currentTarget.value as Role)}>
                        {ROLES.map((r) => (
                          <option value={r}>{r}</option>
                        ))}
                      </select>
                    ) : (
                      m.role
                    )}
                  </td>
                  <td data-label="Granted by">{m.granted_by}</td>
                  <td data-label="Granted at">{dateTime(m.granted_at)}</td>
                  <td class="actions" data-label="">
                    {manage && (
                      <button type="button" class="btn btn-small btn-danger-outline" onClick={() => setConfirm(m)} aria-label={`Revoke the role of ${m.user.email}`}>
                        Revoke
                      </button>
                    )}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {manage && (
        <form
          class="grant-form"
          onSubmit={(e) => {
            e.preventDefault()
            if (!userId) {
              setError('Choose a user to grant a role to.')
              return
            }
            grant(userId, role)
            setUserId('')
          }}
          aria-label={`Grant a role in ${project.id}`}
        >
          <label class="inline">
            User
            <select value={userId} onChange={(e) => setUserId(e.currentTarget.value)}>
              <option value="">{users ? (candidates.length ? 'Choose by email…' : 'Everyone is a member') : 'Loading users…'}</option>
              {candidates.map((u) => (
                <option value={u.id}>
                  {u.email} ({u.display_name})
                </option>
              ))}
            </select>
          </label>
          <label class="inline">
            Role
            <select value={role} onChange={(e) => setRole(e.currentTarget.value as Role)}>
              {ROLES.map((r) => (
                <option value={r}>{r}</option>
              ))}
            </select>
          </label>
          <button type="submit" class="btn btn-primary">
            Grant role
          </button>
        </form>
      )}
      {!manage && <p class="muted small">Only the project's admins manage its members.</p>}
      <Confirm open={!!confirm} title="Revoke this role?" confirmLabel="Revoke" onCancel={() => setConfirm(null)} onConfirm={() => confirm && revoke(confirm)}>
        <p>
          <strong>{confirm?.user.email}</strong> loses access to project {project.id}.
        </p>
      </Confirm>
    </article>
  )
}
