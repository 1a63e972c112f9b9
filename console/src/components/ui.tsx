// Small shared pieces: badges, progress bars, notices, the confirmation dialog.

import type { ComponentChildren } from 'preact'
import { useEffect, useRef, useState } from 'preact/hooks'
import { STARTING, type Instance, type Status } from '../api'

const TONE: Record<Status, string> = {
  provisioning: 'info',
  booting: 'info',
  starting: 'info',
  ready: 'ok',
  unhealthy: 'warn',
  draining: 'warn',
  terminating: 'muted',
  terminated: 'muted',
  failed: 'bad',
  archived: 'muted',
}

export function StatusBadge({ status }: { status: Status }) {
  return <span class={`badge badge-${TONE[status] ?? 'muted'}`} data-status={status}>{status}</span>
}

export function Progress({ value, label }: { value: number; label: string }) {
  return (
    <div class="progress" role="progressbar" aria-label={label} aria-valuemin={0} aria-valuemax={100} aria-valuenow={value}>
      <div class="progress-bar" style={{ width: `${Math.max(0, Math.min(100, value))}%` }} />
    </div>
  )
}

/** Status badge plus a progress bar while the instance is on its way. */
export function StatusCell({ i }: { i: Instance }) {
  const moving = STARTING.includes(i.status) || i.status === 'terminating' || i.status === 'draining'
  return (
    <div class="status-cell">
      <StatusBadge status={i.status} />
      {moving && <Progress value={i.progress} label={`${i.status} ${i.progress}%`} />}
      {i.status === 'failed' && i.status_reason && <span class="reason">{i.status_reason.replace(/_/g, ' ')}</span>}
    </div>
  )
}

export function Notice({ tone = 'info', children }: { tone?: 'info' | 'warn' | 'bad'; children: ComponentChildren }) {
  return (
    <div class={`notice notice-${tone}`} role={tone === 'bad' ? 'alert' : 'status'}>
      {children}
    </div>
  )
}

export function Empty({ title, children }: { title: string; children?: ComponentChildren }) {
  return (
    <div class="empty">
      <p class="empty-title">{title}</p>
      {children}
    </div>
  )
}

export function Loading({ what }: { what: string }) {
  return (
    <p class="loading" role="status">
      Loading {what}…
    </p>
  )
}

export interface ConfirmProps {
  open: boolean
  title: string
  confirmLabel: string
  children: ComponentChildren
  onConfirm: () => void
  onCancel: () => void
}

/** A modal confirmation (native <dialog>: focus trapped, Escape cancels). */
export function Confirm({ open, title, confirmLabel, children, onConfirm, onCancel }: ConfirmProps) {
  const ref = useRef<HTMLDialogElement>(null)
  useEffect(() => {
    const d = ref.current
    if (!d) return
    if (open && !d.open) d.showModal()
    if (!open && d.open) d.close()
  }, [open])
  return (
    <dialog ref={ref} class="dialog" aria-labelledby="confirm-title" onCancel={(e) => (e.preventDefault(), onCancel())}>
      <h2 id="confirm-title">{title}</h2>
      <div class="dialog-body">{children}</div>
      <div class="dialog-actions">
        <button type="button" class="btn" onClick={onCancel} autofocus>
          Cancel
        </button>
        <button type="button" class="btn btn-danger" onClick={onConfirm}>
          {confirmLabel}
        </button>
      </div>
    </dialog>
  )
}

export function Stat({ label, value, sub }: { label: string; value: ComponentChildren; sub?: ComponentChildren }) {
  return (
    <div class="stat">
      <div class="stat-label">{label}</div>
      <div class="stat-value">{value}</div>
      {sub && <div class="stat-sub">{sub}</div>}
    </div>
  )
}

/** The event stream's health, shown in the header. */
export function ConnectionBadge({ state, error }: { state: string; error: { message: string } | null }) {
  const text = state === 'live' ? 'Live' : state === 'connecting' ? 'Connecting…' : 'Reconnecting…'
  return (
    <span class={`conn conn-${state}`} title={error?.message ?? ''} role="status">
      <span class="dot" aria-hidden="true" />
      {text}
    </span>
  )
}

/** A secret shown once (a new token or API key), with a copy button. */
export function SecretOnce({ label, secret, onDone }: { label: string; secret: string; onDone: () => void }) {
  const [copied, setCopied] = useState<'yes' | 'no' | null>(null)
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(secret)
      setCopied('yes')
    } catch {
      setCopied('no')
    }
  }
  return (
    <div class="notice notice-secret" role="status" data-testid="secret-once">
      <p>
        <strong>{label}</strong> Copy it now: it is shown only this once.
      </p>
      <div class="secret-row">
        <input class="mono secret" readOnly value={secret} aria-label={label} onFocus={(e) => e.currentTarget.select()} />
        <button type="button" class="btn btn-small" onClick={copy}>
          Copy
        </button>
        <button type="button" class="btn btn-small" onClick={onDone}>
          Done
        </button>
      </div>
      {copied && <p class="small">{copied === 'yes' ? 'Copied to the clipboard.' : 'The browser refused the clipboard: select the text and copy it.'}</p>}
    </div>
  )
}

/** The message of an error thrown by the API client. */
export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e)
}
