// uPlot, wrapped: a time-series chart (with axes and legend) or a sparkline.

import { useEffect, useRef } from 'preact/hooks'
import uPlot from 'uplot'
import 'uplot/dist/uPlot.min.css'

export const PALETTE = ['#2563eb', '#d97706', '#059669', '#db2777', '#7c3aed', '#0891b2', '#65a30d', '#dc2626']

export interface Series {
  label: string
  color?: string
}

export interface ChartProps {
  title: string
  series: Series[]
  /** [x (unix seconds), y1, y2, ...], each the same length. */
  data: (number | null)[][]
  /** Formats a y value for the axis and legend. */
  fmt?: (v: number) => string
  /** Fixed y range, e.g. [0, 100] for percentages. */
  yRange?: [number, number]
  /** A small chart without axes or legend. */
  spark?: boolean
  height?: number
  /**
   * Bucket width in x units (seconds) for bucketed data: a single empty
   * bucket (heartbeat jitter) is bridged; longer runs of empty buckets stay
   * gaps (the agent was silent).
   */
  step?: number
}

function pointCount(data: (number | null)[][]): number {
  let n = 0
  for (let s = 1; s < data.length; s++) for (const v of data[s]) if (v !== null && v !== undefined) n++
  return n
}

function filled(col: ArrayLike<number | null | undefined>): number {
  let n = 0
  for (let i = 0; i < col.length; i++) if (col[i] !== null && col[i] !== undefined) n++
  return n
}

export function Chart({ title, series, data, fmt = (v) => v.toFixed(1), yRange, spark = false, height, step }: ChartProps) {
  const box = useRef<HTMLDivElement>(null)
  const plot = useRef<uPlot | null>(null)
  const h = height ?? (spark ? 40 : 180)
  const points = pointCount(data)
  const key = series.map((s) => s.label).join('|') + (spark ? ':s' : '') + (step ? `:${step}` : '')
  // Gaps between points (canvas pixels) spanning one missing bucket are drawn over.
  const gaps: uPlot.Series.GapsRefiner | undefined = step
    ? (u, _si, _i0, _i1, nullGaps) => {
        const x0 = u.scales.x.min ?? 0
        const stepPx = Math.abs(u.valToPos(x0 + step, 'x', true) - u.valToPos(x0, 'x', true))
        return nullGaps.filter(([a, b]) => b - a > 2.5 * stepPx)
      }
    : undefined

  useEffect(() => {
    const el = box.current
    if (!el) return
    const width = Math.max(el.clientWidth, 120)
    const opts: uPlot.Options = {
      width,
      height: h,
      legend: { show: !spark, live: true },
      cursor: spark ? { show: false } : { drag: { x: false, y: false } },
      select: { show: false, left: 0, top: 0, width: 0, height: 0 },
      scales: {
        x: { time: true },
        y: yRange ? { range: yRange } : { range: (_u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] },
      },
      axes: spark
        ? [{ show: false }, { show: false }]
        : [
            { stroke: '#64748b', grid: { stroke: '#e2e8f0' }, ticks: { stroke: '#e2e8f0' } },
            { stroke: '#64748b', grid: { stroke: '#e2e8f0' }, ticks: { stroke: '#e2e8f0' }, size: 72, values: (_u, vals) => vals.map((v) => fmt(v)) },
          ],
      series: [
        { label: 'Time', value: (_u: uPlot, v: number | null) => (v === null || v === undefined ? 'latest' : new Date(v * 1000).toLocaleTimeString(undefined, { hour12: false })) },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: s.color ?? PALETTE[i % PALETTE.length],
          fill: spark ? (s.color ?? PALETTE[i % PALETTE.length]) + '22' : undefined,
          width: spark ? 1.5 : 2,
          // Lone samples are drawn as dots; lines need two.
          points: { show: (u: uPlot, si: number) => filled(u.data[si]) < 3, size: spark ? 3 : 5 },
          // uPlot's own default applies unless a refiner is given (an explicit undefined would replace it).
          ...(gaps ? { gaps } : {}),
          // Without a cursor the legend shows the newest value.
          value: (u: uPlot, v: number | null, si: number, idx: number | null) => {
            if (idx === null) {
              const col = u.data[si]
              for (let k = col.length - 1; k >= 0; k--) if (col[k] !== null && col[k] !== undefined) return fmt(col[k] as number)
              return '—'
            }
            return v === null || v === undefined ? '—' : fmt(v)
          },
        })),
      ],
    }
    const u = new uPlot(opts, data as uPlot.AlignedData, el)
    plot.current = u
    // For tests and debugging: the chart's own data.
    ;(el as unknown as { uplot: uPlot }).uplot = u
    const ro = new ResizeObserver(() => {
      const w = Math.max(el.clientWidth, 120)
      if (Math.abs(w - u.width) > 1) u.setSize({ width: w, height: h })
    })
    ro.observe(el)
    return () => {
      ro.disconnect()
      u.destroy()
      plot.current = null
    }
  }, [key, h, yRange?.[0], yRange?.[1]])

  useEffect(() => {
    plot.current?.setData(data as uPlot.AlignedData)
  }, [data])

  return (
    <figure class={spark ? 'chart spark' : 'chart'} data-points={points} aria-label={title}>
      {!spark && <figcaption>{title}</figcaption>}
      <div ref={box} class="chart-canvas" role="img" aria-label={`${title}: ${points ? `${filled(data[1] ?? [])} ${step ? 'points' : 'samples'}` : 'no data'}`} />
      {points === 0 && !spark && <p class="chart-empty">No samples in this window yet.</p>}
    </figure>
  )
}
