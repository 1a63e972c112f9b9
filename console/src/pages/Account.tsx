import { useState } from 'preact/hooks'
import { api, type AccessToken, type CreatedAccessToken } from '../api'
import { Confirm, Empty, errorText, Loading, Notice, SecretOnce } from '../components/ui'
import { dateTime } from '../format'
import { useSession } from '../session'
import { usePoll } from '../store'

/** Who is signed in, their roles, and their personal access tokens. */
export function Account() {
  const s = useSession()
  const me = s.me
  const [tokens, setTokens] = useState<AccessToken[] | null>(null)
  const [error, setError] = useState<string | null>(null)
  const [name, setName] = useState('')
  const [days, setDays] = useState('')
  const [nameError, setNameError] = useState<string | null>(null)
  const [created, setCreated] = useState<CreatedAccessToken | null>(null)
  const [confirm, setConfirm] = useState<AccessToken | null>(null)
  const [busy, setBusy] = useState(false)
  const [reload, setReload] = useState(0)

  usePoll(
    async (signal) => {
      try {
        setTokens(await api.tokens(signal))
      } catch (e) {
        if (!signal.aborted) setError(errorText(e))
      }
    },
    30000,
    [reload],
  )

  const create = async (e: Event) => {
    e.preventDefault()
    if (!name.trim()) {
      setNameError('Name the token (what uses it).')
      return
    }
    const n = days.trim() === '' ? undefined : Number(days)
    if (n !== undefined && (!Number.isInteger(n) || n < 1 || n > 3650)) {
      setNameError(null)
      setError('Expiry: a whole number of days from 1 to 3650, or empty for never.')
      return
    }
    setBusy(true)
    setNameError(null)
    setError(null)
    try {
      const t = await api.createToken(name.trim(), n)
      setCreated(t)
      setName('')
      setDays('')
      setReload((r) => r + 1)
    } catch (err) {
      setError(errorText(err))
    } finally {
      setBusy(false)
    }
  }

  const revoke = async (t: AccessToken) => {
    setConfirm(null)
    setError(null)
    try {
      await api.revokeToken(t.id)
      setReload((r) => r + 1)
    } catch (err) {
      setError(errorText(err))
    }
  }

  if (!me) return <Loading what="your account" />
  const live = (tokens ?? []).filter((t) => !t.revoked_at)

  return (
    <section aria-labelledby="account-title">
      <div class="page-head">
        <h1 id="account-title">Your account</h1>
      </div>
      <div class="card">
        {me.kind === 'admin' ? (
          <p>
            You are signed in with the <strong>admin token</strong>: every project, every action. Use it to bootstrap (create users and projects) and as a break-glass; people should sign in as
            themselves.
          </p>
        ) : (
          <dl class="summary-grid" data-testid="account-summary">
            <div>
              <dt>Name</dt>
              <dd>{me.user?.display_name}</dd>
            </div>
            <div>
              <dt>Email</dt>
              <dd>{me.user?.email}</dd>
            </div>
            <div>
              <dt>Sign-in</dt>
              <dd>{[me.user?.sso ? 'single sign-on' : null, me.user?.has_password ? 'password' : null].filter(Boolean).join(', ') || '—'}</dd>
            </div>
            <div>
              <dt>Roles</dt>
              <dd>{me.memberships.length ? me.memberships.map((m) => `${m.role} in ${m.project_id}`).join(', ') : 'None yet: ask a project admin to grant you a role.'}</dd>
            </div>
          </dl>
        )}
      </div>

      <div class="section-head">
        <h2 id="tokens-title">Personal access tokens</h2>
      </div>
      <p class="muted">For the CLI and scripts: <code>Authorization: Bearer gfp_…</code> acts as you, with your roles.</p>
      {error && <Notice tone="bad">{error}</Notice>}
      {created && <SecretOnce label={`Token “${created.name}”:`} secret={created.token} onDone={() => setCreated(null)} />}

      {me.kind === 'admin' ? (
        <Notice>The admin token has no personal access tokens; sign in as a user to make one.</Notice>
      ) : (
        <form class="card form inline-form" onSubmit={create} noValidate aria-labelledby="new-token-title">
          <h3 id="new-token-title">New token</h3>
          <div class="field-row">
            <div class="field">
              <label for="token-name">Name</label>
              <input id="token-name" value={name} onInput={(e) => setName(e.currentTarget.value)} maxLength={100} aria-invalid={nameError ? 'true' : undefined} aria-describedby={nameError ? 'token-name-error' : undefined} />
              {nameError && (
                <p id="token-name-error" class="field-error" role="alert">
                  {nameError}
                </p>
              )}
            </div>
            <div class="field narrow">
              <label for="token-days">Expires in (days)</label>
              <input id="token-days" type="number" min={1} max={3650} value={days} placeholder="never" onInput={(e) => setDays(e.currentTarget.value)} />
            </div>
          </div>
          <div class="form-actions">
            <button type="submit" class="btn btn-primary" disabled={busy}>
              {busy ? 'Creating…' : 'Create token'}
            </button>
          </div>
        </form>
      )}

      {!tokens ? (
        <Loading what="tokens" />
      ) : tokens.length === 0 ? (
        me.kind === 'admin' ? null : <Empty title="No tokens yet." />
      ) : (
        <div class="table-wrap">
          <table class="table" aria-label="Access tokens">
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Created</th>
                <th scope="col">Expires</th>
                <th scope="col">Last used</th>
                <th scope="col">Revoked</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {tokens.map((t) => (
                <tr data-id={t.id}>
                  <td>{t.name}</td>
                  <td>{dateTime(t.created_at)}</td>
                  <td>{t.expires_at ? dateTime(t.expires_at) : 'never'}</td>
                  <td>{t.last_used_at ? dateTime(t.last_used_at) : 'never'}</td>
                  <td>{t.revoked_at ? dateTime(t.revoked_at) : '—'}</td>
                  <td class="actions">
                    {!t.revoked_at && (
                      <button type="button" class="btn btn-small btn-danger-outline" onClick={() => setConfirm(t)} aria-label={`Revoke token ${t.name}`}>
                        Revoke
                      </button>
                    )}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
          <p class="small muted table-foot">{live.length} live</p>
        </div>
      )}

      <Confirm open={!!confirm} title="Revoke this token?" confirmLabel="Revoke" onCancel={() => setConfirm(null)} onConfirm={() => confirm && revoke(confirm)}>
        <p>
          Whatever uses <strong>{confirm?.name}</strong> stops working at once.
        </p>
      </Confirm>
    </section>
  )
}
