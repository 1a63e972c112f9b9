import type { Instance, InstanceType } from './api'

export function ms(iso: string | null | undefined): number | null {
  if (!iso) return null
  const t = Date.parse(iso)
  return Number.isNaN(t) ? null : t
}

/** 1 h 02 m, 3 m 05 s, 12 s. */
export function duration(millis: number): string {
  if (!Number.isFinite(millis) || millis < 0) return '—'
  const s = Math.floor(millis / 1000)
  if (s < 60) return millis < 10000 && millis % 1000 ? `${(millis / 1000).toFixed(1)} s` : `${s} s`
  const m = Math.floor(s / 60)
  if (m < 60) return `${m} m ${String(s % 60).padStart(2, '0')} s`
  const h = Math.floor(m / 60)
  if (h < 48) return `${h} h ${String(m % 60).padStart(2, '0')} m`
  return `${Math.floor(h / 24)} d ${h % 24} h`
}

export function shortDuration(millis: number): string {
  if (millis < 1000) return `${Math.max(0, Math.round(millis))} ms`
  return duration(millis)
}

export function ago(iso: string | null | undefined, now: number): string {
  const t = ms(iso)
  if (t === null) return 'never'
  const d = now - t
  return d < 1500 ? 'just now' : `${duration(d)} ago`
}

export function time(iso: string): string {
  return new Date(iso).toLocaleTimeString(undefined, { hour12: false })
}

export function dateTime(iso: string | null | undefined): string {
  const t = ms(iso)
  return t === null ? '—' : new Date(t).toLocaleString(undefined, { hour12: false })
}

export function bytes(n: number): string {
  if (!Number.isFinite(n)) return '—'
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024
    i++
  }
  return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`
}

export function mib(n: number): string {
  return bytes(n * 1024 * 1024)
}

export function money(amount: number, currency: string): string {
  try {
    return new Intl.NumberFormat(undefined, { style: 'currency', currency, minimumFractionDigits: 2, maximumFractionDigits: amount < 1 ? 4 : 2 }).format(amount)
  } catch {
    return `${amount.toFixed(2)} ${currency}`
  }
}

export function pct(n: number): string {
  return `${n.toFixed(n < 10 ? 1 : 0)} %`
}

/** Time the instance has been serving: since ready, until terminated. */
export function uptime(i: Instance, now: number): number | null {
  const from = ms(i.ready_at)
  if (from === null) return null
  const to = ms(i.terminated_at) ?? now
  return Math.max(0, to - from)
}

/**
 * What the instance has cost: from its billing interval and the price it was
 * created at when the server reports them (spend), else an estimate from the
 * catalog price × hours since created, until terminated.
 */
export function costSoFar(i: Instance, t: InstanceType | undefined, now: number): number | null {
  if (typeof i.price_per_hour === 'number') {
    const start = ms(i.billing_started_at)
    if (start === null) return typeof i.cost_so_far === 'number' ? i.cost_so_far : 0
    const end = ms(i.billing_ended_at) ?? now
    return (i.price_per_hour * Math.max(0, end - start)) / 3_600_000
  }
  if (typeof i.cost_so_far === 'number') return i.cost_so_far
  if (!t) return null
  const from = ms(i.created_at)
  if (from === null) return null
  const to = ms(i.terminated_at) ?? now
  return (t.price_per_hour * Math.max(0, to - from)) / 3_600_000
}

/** Ids are time-ordered (their start is a timestamp): the tail tells them apart. */
export function shortId(id: string): string {
  return id.length > 12 ? `${id.slice(0, 2)}…${id.slice(-8)}` : id
}

/** 12,345 (grouped). */
export function num(n: number): string {
  return Number.isFinite(n) ? Math.round(n).toLocaleString() : '—'
}

/** A per-second rate: 0, 0.05, 1.2, 34. */
export function perSec(n: number): string {
  if (!Number.isFinite(n)) return '—'
  if (n === 0) return '0'
  if (n < 0.1) return n.toFixed(3)
  if (n < 10) return n.toFixed(2)
  return n.toFixed(0)
}
