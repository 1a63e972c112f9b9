import { useEffect, useState } from 'preact/hooks'
import { api, ApiError, setToken, type AuthProviders } from '../api'

/** Where single sign-on returns to: this page, hash route included. */
function returnTo(): string {
  const here = location.pathname + location.search + location.hash
  return here.startsWith('/') ? here : '/'
}

export function SignIn({ onSignedIn }: { onSignedIn: () => void }) {
  const [providers, setProviders] = useState<AuthProviders | null>(null)
  const [providersError, setProvidersError] = useState<string | null>(null)
  const [email, setEmail] = useState('')
  const [password, setPassword] = useState('')
  const [token, setTok] = useState('')
  const [useToken, setUseToken] = useState(false)
  const [error, setError] = useState<string | null>(null)
  const [tokenError, setTokenError] = useState<string | null>(null)
  const [busy, setBusy] = useState(false)

  useEffect(() => {
    const ctrl = new AbortController()
    api.providersOfSignIn(ctrl.signal).then(
      (p) => {
        setProviders(p)
        // No way in but the token: show it at once.
        if (!p.password && !p.oidc) setUseToken(true)
      },
      (e) => {
        if (ctrl.signal.aborted) return
        // An older control plane without accounts: the admin token is the way in.
        setProviders({ password: false, oidc: null })
        setUseToken(true)
        if (!(e instanceof ApiError && e.status === 404)) setProvidersError(e instanceof ApiError ? e.message : String(e))
      },
    )
    return () => ctrl.abort()
  }, [])

  const signInWithPassword = async (e: Event) => {
    e.preventDefault()
    if (!email.trim() || !password) {
      setError('Enter your email and password.')
      return
    }
    setBusy(true)
    setError(null)
    try {
      await api.login(email.trim(), password)
      onSignedIn()
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) setError('Wrong email or password.')
      else setError(err instanceof ApiError ? err.message : String(err))
    } finally {
      setBusy(false)
    }
  }

  const signInWithToken = async (e: Event) => {
    e.preventDefault()
    const t = token.trim()
    if (!t) {
      setTokenError('Enter the admin token.')
      return
    }
    setBusy(true)
    setTokenError(null)
    try {
      await api.check(t)
      setToken(t)
      onSignedIn()
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) setTokenError('This token was not accepted.')
      else if (err instanceof ApiError) setTokenError(err.message)
      else setTokenError(String(err))
    } finally {
      setBusy(false)
    }
  }

  const sso = providers?.oidc
  return (
    <main class="signin" id="main">
      <div class="card signin-card">
        <h1>
          <span class="logo" aria-hidden="true">▣</span> gpufleet
        </h1>
        {!providers && <p class="muted">Loading the sign-in methods…</p>}
        {providersError && (
          <p class="field-error" role="alert">
            {providersError}
          </p>
        )}

        {sso && (
          <a class="btn btn-primary btn-block" href={`${sso.login_url}?return_to=${encodeURIComponent(returnTo())}`}>
            Sign in with {sso.name}
          </a>
        )}

        {providers?.password && (
          <form class="signin-form" onSubmit={signInWithPassword} noValidate>
            {/* Not the form's name: "Email" and "Password" label the inputs alone. */}
            <h2 class={sso ? 'or' : 'sr-only'}>{sso ? 'or' : 'Sign in'}</h2>
            <div class="field">
              <label for="email">Email</label>
              <input id="email" name="email" type="email" autocomplete="username" value={email} onInput={(e) => setEmail(e.currentTarget.value)} aria-invalid={error ? 'true' : undefined} aria-describedby={error ? 'signin-error' : undefined} autofocus={!sso} />
            </div>
            <div class="field">
              <label for="password">Password</label>
              <input id="password" name="password" type="password" autocomplete="current-password" value={password} onInput={(e) => setPassword(e.currentTarget.value)} aria-invalid={error ? 'true' : undefined} aria-describedby={error ? 'signin-error' : undefined} />
            </div>
            {error && (
              <p id="signin-error" class="field-error" role="alert">
                {error}
              </p>
            )}
            <button type="submit" class={sso ? 'btn btn-block' : 'btn btn-primary btn-block'} disabled={busy}>
              {busy && !useToken ? 'Signing in…' : 'Sign in'}
            </button>
          </form>
        )}

        {providers && !useToken && (
          <button type="button" class="btn-link" onClick={() => setUseToken(true)} aria-expanded="false" aria-controls="token-form">
            Use an admin token instead
          </button>
        )}
        {useToken && (
          <form id="token-form" class="signin-form token-form" onSubmit={signInWithToken} noValidate>
            <h2 class="or">Bootstrap and break-glass</h2>
            <div class="field">
              <label for="token">Admin token</label>
              <input
                id="token"
                name="token"
                type="password"
                autocomplete="off"
                value={token}
                onInput={(e) => setTok(e.currentTarget.value)}
                aria-invalid={tokenError ? 'true' : undefined}
                aria-describedby={`token-help${tokenError ? ' token-error' : ''}`}
                autofocus
              />
              <p id="token-help" class="help">
                <code>gpufleet up</code> writes it to <code>&lt;data-dir&gt;/admin-token</code>. It is kept for this browser tab only. For bootstrap and break-glass.
              </p>
              {tokenError && (
                <p id="token-error" class="field-error" role="alert">
                  {tokenError}
                </p>
              )}
            </div>
            <button type="submit" class="btn btn-block" disabled={busy}>
              {busy ? 'Signing in…' : 'Sign in with the token'}
            </button>
          </form>
        )}
      </div>
    </main>
  )
}
