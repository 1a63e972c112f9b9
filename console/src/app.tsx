import { useEffect, useState } from 'preact/hooks'
import { getToken, onUnauthorized, signOut } from './api'
import { ConnectionBadge, Notice } from './components/ui'
import { Create } from './pages/Create'
import { DeploymentCreate } from './pages/DeploymentCreate'
import { DeploymentDetail } from './pages/DeploymentDetail'
import { Deployments } from './pages/Deployments'
import { Detail } from './pages/Detail'
import { Instances } from './pages/Instances'
import { Models } from './pages/Models'
import { Observability } from './pages/Observability'
import { Overview } from './pages/Overview'
import { SignIn } from './pages/SignIn'
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
]

export function App() {
  const [signedIn, setSignedIn] = useState(!!getToken())
  useEffect(() => onUnauthorized(() => setSignedIn(false)), [])
  useEffect(() => {
    if (signedIn) startFleet()
    else {
      stopFleet()
      forgetUsage()
    }
  }, [signedIn])

  if (!signedIn) return <SignIn onSignedIn={() => setSignedIn(true)} />
  return <Shell />
}

function Shell() {
  const path = useHashPath()
  const fleet = useFleet()
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
          <button type="button" class="btn btn-small btn-ghost" onClick={signOut}>
            Sign out
          </button>
        </div>
      </header>
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
