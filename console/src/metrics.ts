// Samples → chart columns. Windows are cut client-side from recent samples
// (the API keeps the newest 1000 per request) until metric history lands.

import type { Sample } from './api'
import { bytes, pct } from './format'

export const WINDOWS = [
  { key: '5m', label: '5 m', ms: 5 * 60_000, limit: 400, poll: 2000 },
  { key: '1h', label: '1 h', ms: 3_600_000, limit: 1000, poll: 5000 },
  { key: '24h', label: '24 h', ms: 24 * 3_600_000, limit: 1000, poll: 15000 },
  { key: '7d', label: '7 d', ms: 7 * 24 * 3_600_000, limit: 1000, poll: 30000 },
] as const

export type WindowKey = (typeof WINDOWS)[number]['key']

export function windowOf(key: string) {
  return WINDOWS.find((w) => w.key === key) ?? WINDOWS[0]
}

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
}

const xs = (ss: Sample[]) => ss.map((s) => Date.parse(s.at) / 1000)
const ratio = (a: number, b: number) => (b > 0 ? (100 * a) / b : null)
const rate = (v: number) => `${bytes(v)}/s`

/** Every chart of the instance detail page. */
export function detailCharts(ss: Sample[]): ChartSpec[] {
  const x = xs(ss)
  const gpuCount = ss.reduce((n, s) => Math.max(n, s.gpus.length), 0)
  const gpuIdx = Array.from({ length: gpuCount }, (_, i) => i)
  const perGpu = (f: (g: Sample['gpus'][number]) => number) => gpuIdx.map((i) => ss.map((s) => (s.gpus[i] ? f(s.gpus[i]) : null)))
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
      { id: 'gpu-vram', title: 'GPU memory used', labels: gpuLabels, data: [x, ...perGpu((g) => g.mem_used_mib / 1024)], fmt: (v) => `${v.toFixed(v < 10 ? 1 : 0)} GiB` },
      { id: 'gpu-temp', title: 'GPU temperature', labels: gpuLabels, data: [x, ...perGpu((g) => g.temp_c)], fmt: (v) => `${v.toFixed(0)} °C` },
      { id: 'gpu-power', title: 'GPU power', labels: gpuLabels, data: [x, ...perGpu((g) => g.power_w)], fmt: (v) => `${v.toFixed(0)} W` },
    )
  }
  charts.push({
    id: 'engine',
    title: 'Engine requests',
    labels: ['Running', 'Waiting'],
    data: [x, ss.map((s) => s.engine.requests_running), ss.map((s) => s.engine.requests_waiting)],
    fmt: (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)),
  })
  return charts
}

/** Per-instance sparklines for the observability page. */
export function sparkCharts(ss: Sample[]): ChartSpec[] {
  const x = xs(ss)
  const mean = (f: (g: Sample['gpus'][number]) => number) => ss.map((s) => (s.gpus.length ? s.gpus.reduce((a, g) => a + f(g), 0) / s.gpus.length : null))
  const sum = (f: (g: Sample['gpus'][number]) => number) => ss.map((s) => (s.gpus.length ? s.gpus.reduce((a, g) => a + f(g), 0) : null))
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

/** Heartbeat freshness from the newest sample's age. */
export function freshness(latestAt: string | null | undefined, now: number): { tone: 'ok' | 'warn' | 'bad' | 'muted'; label: string } {
  if (!latestAt) return { tone: 'muted', label: 'no heartbeat' }
  const age = now - Date.parse(latestAt)
  if (age < 15_000) return { tone: 'ok', label: 'fresh' }
  if (age < 60_000) return { tone: 'warn', label: 'late' }
  return { tone: 'bad', label: 'stale' }
}
