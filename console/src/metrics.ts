// Chart columns for the instance detail page (from the metric history API,
// or from recent samples where the history API does not answer) and for
// the observability page's sparklines (from recent samples).

import type { MetricSeries, Sample } from './api'
import { bytes, pct } from './format'

/** The steps the history API accepts, in ms (crates/domain/src/metrics.rs, ALLOWED_STEPS_MS). */
export const ALLOWED_STEPS_MS = [
  5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000, 1_800_000, 3_600_000, 7_200_000, 10_800_000, 21_600_000,
  43_200_000, 86_400_000,
]
/** The most buckets one series may have (MAX_POINTS). */
export const MAX_POINTS = 1500
/** About this many points per chart: enough for a 1280 px screen, light to fetch every few seconds. */
const TARGET_POINTS = 300

/** `5s`, `15s`, `5m`, `1h`, `1d`: how the API writes a step. */
export function stepText(ms: number): string {
  if (ms % 86_400_000 === 0) return `${ms / 86_400_000}d`
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`
  if (ms % 60_000 === 0) return `${ms / 60_000}m`
  return `${ms / 1000}s`
}

/** The finest allowed step giving at most `target` buckets over `windowMs` (never more than MAX_POINTS). */
export function stepFor(windowMs: number, target = TARGET_POINTS): number {
  const cap = Math.min(target, MAX_POINTS - 1)
  return ALLOWED_STEPS_MS.find((s) => windowMs / s <= cap) ?? ALLOWED_STEPS_MS[ALLOWED_STEPS_MS.length - 1]
}

function win(key: string, label: string, ms: number, poll: number) {
  const step = stepFor(ms)
  return { key, label, ms, step, stepText: stepText(step), poll }
}

/** Chart windows: 5 m in 5 s buckets, 1 h in 15 s, 24 h in 5 m, 7 d in 1 h; re-fetched every `poll` ms. */
export const WINDOWS = [win('5m', '5 m', 5 * 60_000, 3000), win('1h', '1 h', 3_600_000, 5000), win('24h', '24 h', 24 * 3_600_000, 10000), win('7d', '7 d', 7 * 24 * 3_600_000, 30000)] as const

export type WindowKey = '5m' | '1h' | '24h' | '7d'

export function windowOf(key: string) {
  return WINDOWS.find((w) => w.key === key) ?? WINDOWS[0]
}

/**
 * The window to ask for: `[to - ms, to)` with `to` the end of the bucket
 * holding `end` (now, or when the instance was terminated), so buckets stay
 * put between polls and the newest one is the one filling up.
 */
export function windowBounds(w: { ms: number; step: number }, end: number): { from: number; to: number } {
  const to = (Math.floor(end / w.step) + 1) * w.step
  return { from: to - w.ms, to }
}

/** Recent samples to ask for where the history API does not answer (the API's maximum). */
export const FALLBACK_LIMIT = 1000

/** Samples newer than `windowMs` before `now` (the fallback without the history API). */
export function inWindow(samples: Sample[], windowMs: number, now: number): Sample[] {
  const from = now - windowMs
  return samples.filter((s) => Date.parse(s.at) >= from)
}

export type Columns = (number | null)[][]

export interface ChartSpec {
  id: string
  title: string
  labels: string[]
  data: Columns
  fmt: (v: number) => string
  yRange?: [number, number]
  /** Bucket width in seconds: single empty buckets are bridged, longer runs drawn as gaps. */
  step?: number
}

const xs = (ss: Sample[]) => ss.map((s) => Date.parse(s.at) / 1000)
const ratio = (a: number, b: number) => (b > 0 ? (100 * a) / b : null)
const rate = (v: number) => `${bytes(v)}/s`

const count = (v: number) => (Number.isInteger(v) ? String(v) : v.toFixed(1))
const gib = (v: number) => `${v.toFixed(v < 10 ? 1 : 0)} GiB`
const celsius = (v: number) => `${v.toFixed(0)} °C`
const watts = (v: number) => `${v.toFixed(0)} W`
const perSecond = (v: number) => `${v < 10 ? v.toFixed(1) : v.toFixed(0)}/s`
const seconds = (v: number) => (v < 1 ? `${(v * 1000).toFixed(0)} ms` : `${v.toFixed(2)} s`)
const map = (col: (number | null)[], f: (v: number) => number) => col.map((v) => (v === null || v === undefined ? null : f(v)))

/** Every chart of the instance detail page, from the history API's buckets (averages per bucket). */
export function seriesCharts(m: MetricSeries): ChartSpec[] {
  const x = m.timestamps.map((t) => Date.parse(t) / 1000)
  const step = x.length > 1 ? x[1] - x[0] : undefined
  const gpus = [...m.gpus].sort((a, b) => a.index - b.index)
  const gpuLabels = gpus.map((g) => `GPU ${g.index}`)
  const charts: ChartSpec[] = [
    { id: 'cpu', title: 'CPU', labels: ['CPU'], data: [x, m.cpu_pct], fmt: pct },
    { id: 'memory', title: 'Memory used', labels: ['Memory'], data: [x, m.mem_pct], fmt: pct, yRange: [0, 100] },
    { id: 'disk', title: 'Disk used', labels: ['Disk'], data: [x, m.disk_pct], fmt: pct, yRange: [0, 100] },
    { id: 'network', title: 'Network', labels: ['Received', 'Sent'], data: [x, m.net_rx_bps, m.net_tx_bps], fmt: rate },
  ]
  if (gpus.length) {
    charts.push(
      { id: 'gpu-util', title: 'GPU utilisation', labels: gpuLabels, data: [x, ...gpus.map((g) => g.util_pct)], fmt: pct, yRange: [0, 100] },
      { id: 'gpu-vram', title: 'GPU memory used', labels: gpuLabels, data: [x, ...gpus.map((g) => map(g.vram_used_mib, (v) => v / 1024))], fmt: gib },
      { id: 'gpu-temp', title: 'GPU temperature', labels: gpuLabels, data: [x, ...gpus.map((g) => g.temp_c)], fmt: celsius },
      { id: 'gpu-power', title: 'GPU power', labels: gpuLabels, data: [x, ...gpus.map((g) => g.power_w)], fmt: watts },
    )
  }
  charts.push(
    { id: 'engine', title: 'Engine requests', labels: ['Running', 'Waiting'], data: [x, m.requests_running, m.requests_waiting], fmt: count },
    { id: 'tokens', title: 'Engine tokens', labels: ['Prompt', 'Generated'], data: [x, m.prompt_tokens_per_s, m.generation_tokens_per_s], fmt: perSecond },
    { id: 'kv-cache', title: 'KV cache used', labels: ['KV cache'], data: [x, map(m.kv_cache_usage, (v) => v * 100)], fmt: pct, yRange: [0, 100] },
    { id: 'ttft', title: 'Time to first token', labels: ['Mean'], data: [x, m.ttft_s], fmt: seconds },
  )
  for (const c of charts) c.step = step
  return charts
}

/** Every chart of the instance detail page, from raw samples (without the history API). */
export function detailCharts(ss: Sample[]): ChartSpec[] {
  const x = xs(ss)
  const gpuCount = ss.reduce((n, s) => Math.max(n, s.gpus.length), 0)
  const gpuIdx = Array.from({ length: gpuCount }, (_, i) => i)
  const perGpu = (f: (g: Sample['gpus'][number]) => number | null) => gpuIdx.map((i) => ss.map((s) => (s.gpus[i] ? f(s.gpus[i]) : null)))
  const gpuLabels = gpuIdx.map((i) => `GPU ${i}`)
  const charts: ChartSpec[] = [
    { id: 'cpu', title: 'CPU', labels: ['CPU'], data: [x, ss.map((s) => s.system.cpu_pct)], fmt: pct },
    {
      id: 'memory',
      title: 'Memory used',
      labels: ['Memory'],
      data: [x, ss.map((s) => ratio(s.system.mem_used_bytes, s.system.mem_total_bytes))],
      fmt: pct,
      yRange: [0, 100],
    },
    {
      id: 'disk',
      title: 'Disk used',
      labels: ['Disk'],
      data: [x, ss.map((s) => ratio(s.system.disk_used_bytes, s.system.disk_total_bytes))],
      fmt: pct,
      yRange: [0, 100],
    },
    {
      id: 'network',
      title: 'Network',
      labels: ['Received', 'Sent'],
      data: [x, ss.map((s) => s.system.net_rx_bps), ss.map((s) => s.system.net_tx_bps)],
      fmt: rate,
    },
  ]
  if (gpuCount) {
    charts.push(
      { id: 'gpu-util', title: 'GPU utilisation', labels: gpuLabels, data: [x, ...perGpu((g) => g.util_pct)], fmt: pct, yRange: [0, 100] },
      { id: 'gpu-vram', title: 'GPU memory used', labels: gpuLabels, data: [x, ...perGpu((g) => g.mem_used_mib / 1024)], fmt: gib },
      { id: 'gpu-temp', title: 'GPU temperature', labels: gpuLabels, data: [x, ...perGpu((g) => g.temp_c)], fmt: celsius },
      { id: 'gpu-power', title: 'GPU power', labels: gpuLabels, data: [x, ...perGpu((g) => g.power_w)], fmt: watts },
    )
  }
  charts.push({
    id: 'engine',
    title: 'Engine requests',
    labels: ['Running', 'Waiting'],
    data: [x, ss.map((s) => s.engine.requests_running), ss.map((s) => s.engine.requests_waiting)],
    fmt: count,
  })
  return charts
}

/** Per-instance sparklines for the observability page. */
export function sparkCharts(ss: Sample[]): ChartSpec[] {
  const x = xs(ss)
  // Over the GPUs that know the figure; null (a gap, "—") when none does.
  const known = (s: Sample, f: (g: Sample['gpus'][number]) => number | null) => s.gpus.map(f).filter((v): v is number => v !== null)
  const mean = (f: (g: Sample['gpus'][number]) => number | null) =>
    ss.map((s) => {
      const v = known(s, f)
      return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null
    })
  const sum = (f: (g: Sample['gpus'][number]) => number | null) =>
    ss.map((s) => {
      const v = known(s, f)
      return v.length ? v.reduce((a, b) => a + b, 0) : null
    })
  return [
    { id: 'cpu', title: 'CPU', labels: ['CPU'], data: [x, ss.map((s) => s.system.cpu_pct)], fmt: pct },
    { id: 'mem', title: 'Memory', labels: ['Memory'], data: [x, ss.map((s) => ratio(s.system.mem_used_bytes, s.system.mem_total_bytes))], fmt: pct, yRange: [0, 100] },
    { id: 'net', title: 'Network', labels: ['Network'], data: [x, ss.map((s) => s.system.net_rx_bps + s.system.net_tx_bps)], fmt: rate },
    { id: 'disk', title: 'Disk', labels: ['Disk'], data: [x, ss.map((s) => ratio(s.system.disk_used_bytes, s.system.disk_total_bytes))], fmt: pct, yRange: [0, 100] },
    { id: 'gpu', title: 'GPU util', labels: ['GPU'], data: [x, mean((g) => g.util_pct)], fmt: pct, yRange: [0, 100] },
    { id: 'vram', title: 'VRAM', labels: ['VRAM'], data: [x, mean((g) => ratio(g.mem_used_mib, g.mem_total_mib) ?? 0)], fmt: pct, yRange: [0, 100] },
    { id: 'temp', title: 'GPU temp', labels: ['Temp'], data: [x, mean((g) => g.temp_c)], fmt: (v) => `${v.toFixed(0)} °C` },
    { id: 'power', title: 'GPU power', labels: ['Power'], data: [x, sum((g) => g.power_w)], fmt: (v) => `${v.toFixed(0)} W` },
  ]
}

/** Per-instance sparklines from the history API's buckets (GPU figures: mean or sum over the GPUs). */
export function sparkSeriesCharts(m: MetricSeries): ChartSpec[] {
  const x = m.timestamps.map((t) => Date.parse(t) / 1000)
  const step = x.length > 1 ? x[1] - x[0] : undefined
  const across = (f: (g: MetricSeries['gpus'][number], i: number) => number | null, mean: boolean) =>
    x.map((_, i) => {
      let sum = 0
      let n = 0
      for (const g of m.gpus) {
        const v = f(g, i)
        if (v !== null && v !== undefined) {
          sum += v
          n++
        }
      }
      return n ? (mean ? sum / n : sum) : null
    })
  const net = x.map((_, i) => (m.net_rx_bps[i] === null || m.net_tx_bps[i] === null ? null : (m.net_rx_bps[i] as number) + (m.net_tx_bps[i] as number)))
  const charts: ChartSpec[] = [
    { id: 'cpu', title: 'CPU', labels: ['CPU'], data: [x, m.cpu_pct], fmt: pct },
    { id: 'mem', title: 'Memory', labels: ['Memory'], data: [x, m.mem_pct], fmt: pct, yRange: [0, 100] },
    { id: 'net', title: 'Network', labels: ['Network'], data: [x, net], fmt: rate },
    { id: 'disk', title: 'Disk', labels: ['Disk'], data: [x, m.disk_pct], fmt: pct, yRange: [0, 100] },
    { id: 'gpu', title: 'GPU util', labels: ['GPU'], data: [x, across((g, i) => g.util_pct[i], true)], fmt: pct, yRange: [0, 100] },
    {
      id: 'vram',
      title: 'VRAM',
      labels: ['VRAM'],
      data: [x, across((g, i) => (g.vram_used_mib[i] === null || !g.vram_total_mib[i] ? null : ratio(g.vram_used_mib[i] as number, g.vram_total_mib[i] as number)), true)],
      fmt: pct,
      yRange: [0, 100],
    },
    { id: 'temp', title: 'GPU temp', labels: ['Temp'], data: [x, across((g, i) => g.temp_c[i], true)], fmt: celsius },
    { id: 'power', title: 'GPU power', labels: ['Power'], data: [x, across((g, i) => g.power_w[i], false)], fmt: watts },
  ]
  for (const c of charts) c.step = step
  return charts
}

/** Heartbeat freshness from the newest sample's age. */
export function freshness(latestAt: string | null | undefined, now: number): { tone: 'ok' | 'warn' | 'bad' | 'muted'; label: string } {
  if (!latestAt) return { tone: 'muted', label: 'no heartbeat' }
  const age = now - Date.parse(latestAt)
  if (age < 15_000) return { tone: 'ok', label: 'fresh' }
  if (age < 60_000) return { tone: 'warn', label: 'late' }
  return { tone: 'bad', label: 'stale' }
}
