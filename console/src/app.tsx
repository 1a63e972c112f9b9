import { useEffect, useState } from 'preact/hooks'
import { authMode, onForbidden, onUnauthorized, signOut } from './api'
import { ConnectionBadge, Notice } from './components/ui'
import { Account } from './pages/Account'
import { ApiKeys } from './pages/ApiKeys'
import { Audit } from './pages/Audit'
import { Create } from './pages/Create'
import { DeploymentCreate } from './pages/DeploymentCreate'
import { DeploymentDetail } from './pages/DeploymentDetail'
import { Deployments } from './pages/Deployments'
import { Detail } from './pages/Detail'
import { Instances } from './pages/Instances'
import { Models } from './pages/Models'
import { Observability } from './pages/Observability'
import { Overview } from './pages/Overview'
import { Projects } from './pages/Projects'
import { SignIn } from './pages/SignIn'
import { Spend } from './pages/Spend'
import { chooseProject, forgetSession, loadSession, useSession, whoAmI } from './session'
import { startFleet, stopFleet, useFleet } from './store'
import { forgetUsage } from './usage'

/** The path after `#`, e.g. `/instances/i-...`. */
function useHashPath(): string {
  const read = () => location.hash.replace(/^#/, '') || '/'
  const [path, setPath] = useState(read())
  useEffect(() => {
    const on = () => setPath(read())
    window.addEventListener('hashchange', on)
    return () => window.removeEventListener('hashchange', on)
  }, [])
  return path
}

const NAV = [
  { href: '#/', label: 'Overview', match: (p: string) => p === '/' },
  { href: '#/instances', label: 'Instances', match: (p: string) => p.startsWith('/instances') },
  { href: '#/deployments', label: 'Deployments', match: (p: string) => p.startsWith('/deployments') },
  { href: '#/observability', label: 'Observability', match: (p: string) => p.startsWith('/observability') },
  { href: '#/models', label: 'Models', match: (p: string) => p.startsWith('/models') },
  { href: '#/api-keys', label: 'API keys', match: (p: string) => p.startsWith('/api-keys') },
  { href: '#/spend', label: 'Spend', match: (p: string) => p.startsWith('/spend') },
  { href: '#/audit', label: 'Audit', match: (p: string) => p.startsWith('/audit') },
  { href: '#/projects', label: 'Projects', match: (p: string) => p.startsWith('/projects') },
]

export function App() {
  // The admin token in this tab, or a session's cookies (checked by GET /api/v1/auth/me).
  const [signedIn, setSignedIn] = useState(authMode() !== 'none')
  useEffect(() => onUnauthorized(() => setSignedIn(false)), [])
  // A refusal may mean a role changed: read the roles again, so the pages offer what they allow.
  useEffect(() => onForbidden(() => void loadSession()), [])
  useEffect(() => {
    if (signedIn) {
      startFleet()
      loadSession()
    } else {
      stopFleet()
      forgetUsage()
      forgetSession()
    }
  }, [signedIn])

  if (!signedIn) return <SignIn onSignedIn={() => setSignedIn(true)} />
  return <Shell />
}

function Shell() {
  const path = useHashPath()
  const fleet = useFleet()
  const session = useSession()
  // A message for the page named by `path`, dropped on leaving it.
  const [flash, setFlash] = useState<{ path: string; text: string } | null>(null)

  useEffect(() => {
    // Move focus to the page heading on navigation, for keyboard and screen-reader users.
    const h = document.querySelector<HTMLElement>('main h1')
    h?.setAttribute('tabindex', '-1')
    h?.focus({ preventScroll: true })
    if (flash && path !== flash.path) setFlash(null)
  }, [path])

  let page
  const detail = path.match(/^\/instances\/([^/]+)$/)
  const deployment = path.match(/^\/deployments\/([^/]+)$/)
  if (path === '/') page = <Overview />
  else if (path === '/instances') page = <Instances flash={flash?.path === path ? flash.text : null} />
  else if (path === '/instances/new')
    page = (
      <Create
        onCreated={(n) => {
          location.hash = '#/instances'
          setFlash({ path: '/instances', text: `Created ${n} instance${n === 1 ? '' : 's'}. They appear below as they start.` })
        }}
      />
    )
  else if (detail) page = <Detail key={detail[1]} id={decodeURIComponent(detail[1])} />
  else if (path === '/deployments') page = <Deployments flash={flash?.path === path ? flash.text : null} />
  else if (path === '/deployments/new')
    page = (
      <DeploymentCreate
        onCreated={(id) => {
          location.hash = `#/deployments/${id}`
        }}
      />
    )
  else if (deployment)
    page = (
      <DeploymentDetail
        key={deployment[1]}
        id={decodeURIComponent(deployment[1])}
        onDeleted={(name) => {
          location.hash = '#/deployments'
          setFlash({ path: '/deployments', text: `Deleting ${name}: its replicas drain, then terminate. It leaves this list once none is live.` })
        }}
      />
    )
  else if (path === '/observability') page = <Observability />
  else if (path === '/models') page = <Models />
  else if (path === '/api-keys') page = <ApiKeys />
  else if (path === '/spend') page = <Spend />
  else if (path === '/audit') page = <Audit />
  else if (path === '/projects') page = <Projects />
  else if (path === '/account') page = <Account />
  else
    page = (
      <Notice tone="warn">
        No page here. <a href="#/">Go to the overview</a>.
      </Notice>
    )

  const unreachable = fleet.stream === 'retrying' && fleet.error
  return (
    <>
      <a class="skip" href="#main" onClick={(e) => (e.preventDefault(), document.getElementById('main')?.focus())}>
        Skip to content
      </a>
      <header class="top">
        <a class="brand" href="#/">
          <span class="logo" aria-hidden="true">▣</span> gpufleet
        </a>
        <nav aria-label="Main">
          <ul>
            {NAV.map((n) => (
              <li>
                <a href={n.href} aria-current={n.match(path) ? 'page' : undefined}>
                  {n.label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <div class="top-right">
          <ConnectionBadge state={fleet.stream} error={fleet.error} />
          <label class="project-switch">
            <span>Project</span>
            <select value={session.project ?? ''} onChange={(e) => chooseProject(e.currentTarget.value || null)} disabled={!session.projects}>
              <option value="">All projects</option>
              {(session.projects ?? []).map((p) => (
                <option value={p.id}>
                  {p.id} · {p.role}
                </option>
              ))}
            </select>
          </label>
          <a class="who" href="#/account" data-testid="who" title="Your account and access tokens" aria-current={path === '/account' ? 'page' : undefined}>
            <span class="sr-only">Signed in as </span>
            {whoAmI(session.me)}
          </a>
          <button type="button" class="btn btn-small btn-ghost" onClick={() => signOut()}>
            Sign out
          </button>
        </div>
      </header>
      {session.error && (
        <div class="banner" role="alert">
          Cannot read your account: {session.error}
        </div>
      )}
      {unreachable && (
        <div class="banner" role="alert">
          {fleet.error!.message} Showing the last known state; reconnecting…
        </div>
      )}
      <main id="main" tabindex={-1}>
        {page}
      </main>
    </>
  )
}
