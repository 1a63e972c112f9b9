// App-wide state: the live instance list (fed by the event stream) and the
// provider catalog (for prices). One stream for the whole app.

import { useEffect, useState } from 'preact/hooks'
import { api, ApiError, followEvents, type Instance, type InstanceType, type StreamState } from './api'
import { observable, useFollow } from './observable'

export interface FleetState {
  /** Instances by id, archived ones removed. */
  instances: Map<string, Instance>
  /** False until the first snapshot arrived. */
  loaded: boolean
  stream: StreamState
  error: ApiError | null
}

const fleet = observable<FleetState>({ instances: new Map(), loaded: false, stream: 'connecting', error: null })
const set = fleet.set
let stop: (() => void) | null = null

/** Starts following the event stream (after sign-in). */
export function startFleet(): void {
  if (stop) return
  stop = followEvents({
    onEvent: (e) => {
      if (e.type === 'snapshot') {
        const m = new Map<string, Instance>()
        for (const i of e.instances) if (i.status !== 'archived') m.set(i.id, i)
        set({ instances: m, loaded: true, error: null })
      } else {
        const m = new Map(fleet.get().instances)
        const old = m.get(e.instance.id)
        // Events carry a generation: never let an older one win.
        if (old && old.generation > e.instance.generation) return
        if (e.instance.status === 'archived') m.delete(e.instance.id)
        else m.set(e.instance.id, e.instance)
        set({ instances: m })
      }
    },
    onState: (s, error) => set({ stream: s, error: s === 'live' ? null : (error ?? fleet.get().error) }),
  })
}

export function stopFleet(): void {
  stop?.()
  stop = null
  catalog = null
  set({ instances: new Map(), loaded: false, stream: 'connecting', error: null })
}

/** Applies an instance the API just answered with, before its event arrives. */
export function upsert(i: Instance): void {
  const old = fleet.get().instances.get(i.id)
  if (old && old.generation > i.generation) return
  const m = new Map(fleet.get().instances)
  if (i.status === 'archived') m.delete(i.id)
  else m.set(i.id, i)
  set({ instances: m })
}

export function useFleet(): FleetState {
  return fleet.use()
}

/** Instance types by `provider/type`, loaded once. */
export type Catalog = Map<string, InstanceType>
let catalog: Promise<Catalog> | null = null

export function loadCatalog(): Promise<Catalog> {
  if (!catalog) {
    catalog = (async () => {
      const m: Catalog = new Map()
      const { providers } = await api.providers()
      const lists = await Promise.all(providers.map((p) => api.instanceTypes(p.name)))
      for (const l of lists) for (const t of l.instance_types) m.set(`${l.provider}/${t.name}`, t)
      return m
    })()
    catalog.catch(() => {
      catalog = null
    })
  }
  return catalog
}

export function useCatalog(): Catalog | null {
  const [c, setC] = useState<Catalog | null>(null)
  useEffect(() => {
    let live = true
    loadCatalog().then(
      (m) => live && setC(m),
      () => undefined,
    )
    return () => {
      live = false
    }
  }, [])
  return c
}

/** Re-renders every `ms` (for ages, uptimes and costs). */
export function useTick(ms = 1000): number {
  const [now, setNow] = useState(Date.now())
  useEffect(() => {
    const t = window.setInterval(() => setNow(Date.now()), ms)
    return () => window.clearInterval(t)
  }, [ms])
  return now
}

/** Calls `fn` now and every `ms` while mounted (and while the tab is visible). */
export function usePoll(fn: (signal: AbortSignal) => Promise<void>, ms: number, deps: unknown[]): void {
  useEffect(() => {
    let ctrl = new AbortController()
    let timer: number | undefined
    let live = true
    const tick = async () => {
      if (!live) return
      if (document.visibilityState !== 'hidden') {
        ctrl = new AbortController()
        try {
          await fn(ctrl.signal)
        } catch {
          // fn reports its own errors
        }
      }
      if (live) timer = window.setTimeout(tick, ms)
    }
    tick()
    return () => {
      live = false
      ctrl.abort()
      window.clearTimeout(timer)
    }
  }, deps)
}

// ---------------------------------------------------------------------------
// Deployment names by id, for the links from instances to their deployment.

const deploymentNames = new Map<string, string>()
let namesLookedUpAt = 0
const nameListeners = new Set<() => void>()

/** Remembers a deployment's name (from a page that read it). */
export function rememberDeployment(d: { id: string; name: string }): void {
  if (deploymentNames.get(d.id) === d.name) return
  deploymentNames.set(d.id, d.name)
  nameListeners.forEach((l) => l())
}

/** Names of these deployments (looked up, at most every 10 s, while one is unknown). */
export function useDeploymentNames(ids: (string | null | undefined)[]): Map<string, string> {
  useFollow(nameListeners)
  const unknown = [...new Set(ids.filter((id): id is string => !!id && !deploymentNames.has(id)))].sort().join(',')
  useEffect(() => {
    if (!unknown || Date.now() - namesLookedUpAt < 10_000) return
    namesLookedUpAt = Date.now()
    api.deployments({ includeDeleted: true }).then(
      (l) => l.deployments.forEach(rememberDeployment),
      () => undefined,
    )
  }, [unknown])
  return deploymentNames
}

// ---------------------------------------------------------------------------
// The header's project, applied to the live instance list.

/**
 * Whether an instance belongs to the project chosen in the header (all: yes).
 * Instance views carry `project_id`; for a server whose views do not yet,
 * the ids of `GET /api/v1/instances?project=` (polled) decide.
 */
export function useInProject(project: string | null): (i: Instance) => boolean {
  const [ids, setIds] = useState<Set<string> | null>(null)
  const needIds = !!project && [...fleet.get().instances.values()].some((i) => i.project_id === undefined)
  usePoll(
    async (signal) => {
      if (!project || !needIds) return
      try {
        const l = await api.instances({ project, includeArchived: false }, signal)
        setIds(new Set(l.instances.map((i) => i.id)))
      } catch {
        // The list keeps the last known set.
      }
    },
    5000,
    [project, needIds],
  )
  if (!project) return () => true
  return (i) => (i.project_id !== undefined ? i.project_id === project : !!ids?.has(i.id))
}
