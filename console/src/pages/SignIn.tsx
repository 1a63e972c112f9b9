import { useState } from 'preact/hooks'
import { api, ApiError, setToken } from '../api'

export function SignIn({ onSignedIn }: { onSignedIn: () => void }) {
  const [token, setTok] = useState('')
  const [error, setError] = useState<string | null>(null)
  const [busy, setBusy] = useState(false)

  const submit = async (e: Event) => {
    e.preventDefault()
    const t = token.trim()
    if (!t) {
      setError('Enter the admin token.')
      return
    }
    setBusy(true)
    setError(null)
    try {
      await api.check(t)
      setToken(t)
      onSignedIn()
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) setError('This token was not accepted.')
      else if (err instanceof ApiError) setError(err.message)
      else setError(String(err))
    } finally {
      setBusy(false)
    }
  }

  return (
    <main class="signin" id="main">
      <form class="card signin-card" onSubmit={submit} noValidate>
        <h1>
          <span class="logo" aria-hidden="true">▣</span> gpufleet
        </h1>
        <p class="muted">Sign in with the admin token of this control plane.</p>
        <div class="field">
          <label for="token">Admin token</label>
          <input
            id="token"
            name="token"
            type="password"
            autocomplete="current-password"
            value={token}
            onInput={(e) => setTok(e.currentTarget.value)}
            aria-invalid={error ? 'true' : undefined}
            aria-describedby="token-help token-error"
            autofocus
          />
          <p id="token-help" class="help">
            <code>gpufleet up</code> writes it to <code>&lt;data-dir&gt;/admin-token</code>. It is kept for this browser tab only.
          </p>
          {error && (
            <p id="token-error" class="field-error" role="alert">
              {error}
            </p>
          )}
        </div>
        <button type="submit" class="btn btn-primary" disabled={busy}>
          {busy ? 'Signing in…' : 'Sign in'}
        </button>
      </form>
    </main>
  )
}
