// A module-level state that components follow: one copy for the whole app
// (the signed-in session, the live fleet).

import { useEffect, useState } from 'preact/hooks'

export interface Observable<T> {
  /** The current state. */
  get(): T
  /** Merges `next` into the state and re-renders every follower. */
  set(next: Partial<T>): void
  /** Follows the state in a component: it re-renders on every `set`. */
  use(): T
}

export function observable<T extends object>(initial: T): Observable<T> {
  let state = initial
  const listeners = new Set<() => void>()
  return {
    get: () => state,
    set(next) {
      state = { ...state, ...next }
      listeners.forEach((l) => l())
    },
    use() {
      useFollow(listeners)
      return state
    },
  }
}

/** Re-renders the component whenever `listeners` are called. */
export function useFollow(listeners: Set<() => void>): void {
  const [, force] = useState(0)
  useEffect(() => {
    const l = () => force((n) => n + 1)
    listeners.add(l)
    return () => {
      listeners.delete(l)
    }
  }, [listeners])
}
