// Who is signed in, their projects and the project chosen in the header.
// One copy for the whole app, loaded after sign-in.

import { api, type Me, type Project, type Role } from './api'
import { observable } from './observable'

/** What a role allows, as the server's `Role::allows` (crates/domain teams). */
export type Permission = 'read' | 'operate' | 'manage_keys' | 'manage_members'

const ALLOWS: Record<Role, Permission[]> = {
  viewer: ['read'],
  operator: ['read', 'operate', 'manage_keys'],
  admin: ['read', 'operate', 'manage_keys', 'manage_members'],
}

export function allows(role: Role | null | undefined, p: Permission): boolean {
  return !!role && ALLOWS[role].includes(p)
}

export interface SessionState {
  me: Me | null
  projects: Project[] | null
  /** The project chosen in the header; null: all projects. */
  project: string | null
  error: string | null
}

const PROJECT_KEY = 'gpufleet.project'

const session = observable<SessionState>({
  me: null,
  projects: null,
  project: sessionStorage.getItem(PROJECT_KEY),
  error: null,
})
const set = session.set

/** Reads who is signed in and their projects (after sign-in, and after a project or role changes). */
export async function loadSession(): Promise<void> {
  try {
    const [me, projects] = await Promise.all([api.me(), api.projects()])
    const chosen = session.get().project
    const project = chosen && projects.some((p) => p.id === chosen) ? chosen : null
    set({ me, projects, project, error: null })
  } catch (e) {
    set({ error: e instanceof Error ? e.message : String(e) })
  }
}

/** After sign-out: the next person chooses their own project. */
export function forgetSession(): void {
  sessionStorage.removeItem(PROJECT_KEY)
  set({ me: null, projects: null, project: null, error: null })
}

export function chooseProject(p: string | null): void {
  if (p) sessionStorage.setItem(PROJECT_KEY, p)
  else sessionStorage.removeItem(PROJECT_KEY)
  set({ project: p })
}

export function useSession(): SessionState {
  return session.use()
}

/** The caller's role in `project` (the admin token: admin everywhere). */
export function roleIn(s: SessionState, project: string | null | undefined): Role | null {
  if (s.me?.kind === 'admin') return 'admin'
  if (!project) return null
  return s.projects?.find((p) => p.id === project)?.role ?? null
}

/**
 * Whether the caller may do `p` where the header points: in the chosen
 * project, or (all projects) in at least one of theirs.
 */
export function canHere(s: SessionState, p: Permission): boolean {
  if (s.me?.kind === 'admin') return true
  if (s.project) return allows(roleIn(s, s.project), p)
  return (s.projects ?? []).some((x) => allows(x.role, p))
}

/** Projects where the caller may do `p` (for a create form's project field). */
export function projectsAllowing(s: SessionState, p: Permission): Project[] {
  return (s.projects ?? []).filter((x) => allows(x.role, p))
}

export function isAdminToken(s: SessionState): boolean {
  return s.me?.kind === 'admin'
}

/** How the caller is named in the header. */
export function whoAmI(me: Me | null): string {
  if (!me) return '…'
  if (me.kind === 'admin') return 'Admin token'
  return me.user?.display_name || me.user?.email || 'Signed in'
}
