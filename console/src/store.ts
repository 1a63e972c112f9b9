// App-wide state: the live instance list (fed by the event stream) and the
// provider catalog (for prices). One stream for the whole app.

import { useEffect, useState } from 'preact/hooks'
import { api, ApiError, followEvents, type Instance, type InstanceType, type StreamState } from './api'

export interface FleetState {
  /** Instances by id, archived ones removed. */
  instances: Map<string, Instance>
  /** False until the first snapshot arrived. */
  loaded: boolean
  stream: StreamState
  error: ApiError | null
}

let state: FleetState = { instances: new Map(), loaded: false, stream: 'connecting', error: null }
const listeners = new Set<() => void>()
let stop: (() => void) | null = null

function set(next: Partial<FleetState>) {
  state = { ...state, ...next }
  listeners.forEach((l) => l())
}

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
        const m = new Map(state.instances)
        const old = m.get(e.instance.id)
        // Events carry a generation: never let an older one win.
        if (old && old.generation > e.instance.generation) return
        if (e.instance.status === 'archived') m.delete(e.instance.id)
        else m.set(e.instance.id, e.instance)
        set({ instances: m })
      }
    },
    onState: (s, error) => set({ stream: s, error: s === 'live' ? null : (error ?? state.error) }),
  })
}

export function stopFleet(): void {
  stop?.()
  stop = null
  state = { instances: new Map(), loaded: false, stream: 'connecting', error: null }
  catalog = null
  listeners.forEach((l) => l())
}

/** Applies an instance the API just answered with, before its event arrives. */
export function upsert(i: Instance): void {
  const old = state.instances.get(i.id)
  if (old && old.generation > i.generation) return
  const m = new Map(state.instances)
  if (i.status === 'archived') m.delete(i.id)
  else m.set(i.id, i)
  set({ instances: m })
}

export function useFleet(): FleetState {
  const [, force] = useState(0)
  useEffect(() => {
    const l = () => force((n) => n + 1)
    listeners.add(l)
    return () => {
      listeners.delete(l)
    }
  }, [])
  return state
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
  const [, force] = useState(0)
  useEffect(() => {
    const l = () => force((n) => n + 1)
    nameListeners.add(l)
    return () => {
      nameListeners.delete(l)
    }
  }, [])
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
