// Router usage (`GET /api/v1/usage`): running totals per API key and per
// instance. Rates are the change between polls: the router adds its counts
// to the totals every few seconds (router.usage_flush_interval_ms, 5 s by
// default), so a rate is taken over the polls of the last RATE_WINDOW_MS to
// smooth that out. The polls are kept across pages.

import { useState } from 'preact/hooks'
import { api, ApiError, type Usage, type UsageReport } from './api'
import { usePoll } from './store'

export const USAGE_POLL_MS = 5000
/** Rates are averaged over about this long. */
export const RATE_WINDOW_MS = 30_000

export interface Rates {
  requests: number
  errors: number
  prompt_tokens: number
  completion_tokens: number
}

export interface UsageState {
  report: UsageReport | null
  /** Per key or instance id; empty until two polls are apart. */
  rates: Map<string, Rates>
  /** Over how long the rates were taken, in ms (0: no rate yet). */
  spanMs: number
  /** null until the first answer; false where the API has no usage endpoint. */
  available: boolean | null
  error: string | null
}

interface Snapshot {
  at: number
  totals: Map<string, Usage>
}

let snapshots: Snapshot[] = []
let last: UsageReport | null = null

function totalsOf(r: UsageReport): Map<string, Usage> {
  const m = new Map<string, Usage>()
  for (const u of r.keys) m.set('key:' + u.id, u)
  for (const u of r.instances) m.set('instance:' + u.id, u)
  return m
}

function record(r: UsageReport, at: number): void {
  last = r
  // After a long pause (another page, a hidden tab) start over rather than average over it.
  snapshots = snapshots.filter((s) => at - s.at <= 2 * RATE_WINDOW_MS)
  snapshots.push({ at, totals: totalsOf(r) })
  // Keep what the rate window needs, plus one older poll.
  const keepFrom = snapshots.findLastIndex((s) => at - s.at >= RATE_WINDOW_MS)
  if (keepFrom > 0) snapshots = snapshots.slice(keepFrom)
  if (snapshots.length > 64) snapshots = snapshots.slice(-64)
}

/** Per-second change since the oldest kept poll, by `key:<id>` / `instance:<id>`. */
function rates(): { rates: Map<string, Rates>; spanMs: number } {
  const out = new Map<string, Rates>()
  if (snapshots.length < 2) return { rates: out, spanMs: 0 }
  const old = snapshots[0]
  const cur = snapshots[snapshots.length - 1]
  const dt = (cur.at - old.at) / 1000
  if (dt <= 0) return { rates: out, spanMs: 0 }
  const per = (a: number, b: number) => Math.max(0, a - b) / dt
  for (const [id, u] of cur.totals) {
    // Absent from the older poll: it had no traffic yet.
    const o = old.totals.get(id)
    out.set(id, {
      requests: per(u.requests, o?.requests ?? 0),
      errors: per(u.errors, o?.errors ?? 0),
      prompt_tokens: per(u.prompt_tokens, o?.prompt_tokens ?? 0),
      completion_tokens: per(u.completion_tokens, o?.completion_tokens ?? 0),
    })
  }
  return { rates: out, spanMs: cur.at - old.at }
}

export function forgetUsage(): void {
  snapshots = []
  last = null
}

/** Polls the usage totals while mounted. Rate keys: `key:<api key id>`, `instance:<instance id>`. */
export function useUsage(): UsageState {
  const [state, setState] = useState<UsageState>(() => ({ report: last, ...rates(), available: last ? true : null, error: null }))
  usePoll(
    async (signal) => {
      try {
        const r = await api.usage(signal)
        record(r, Date.now())
        setState({ report: r, ...rates(), available: true, error: null })
      } catch (e) {
        if (signal.aborted) return
        if (e instanceof ApiError && e.status === 404) setState((s) => ({ ...s, available: false, error: null }))
        else setState((s) => ({ ...s, error: e instanceof ApiError ? e.message : String(e) }))
      }
    },
    USAGE_POLL_MS,
    [],
  )
  return state
}

export function sumRates(list: (Rates | undefined)[]): Rates {
  const r: Rates = { requests: 0, errors: 0, prompt_tokens: 0, completion_tokens: 0 }
  for (const x of list) {
    if (!x) continue
    r.requests += x.requests
    r.errors += x.errors
    r.prompt_tokens += x.prompt_tokens
    r.completion_tokens += x.completion_tokens
  }
  return r
}
