// The gpufleet HTTP API, typed after crates/api/src/views.rs (and accounts.rs,
// audit.rs, api_keys.rs for teams).
// Two ways in: a console session (cookies set by POST /api/v1/auth/login or
// single sign-on; every write echoes the `gpufleet_csrf` cookie in
// `x-csrf-token`), or the admin token, kept in sessionStorage only and sent
// as `Authorization: Bearer`.

export type Status =
  | 'provisioning'
  | 'booting'
  | 'starting'
  | 'ready'
  | 'unhealthy'
  | 'draining'
  | 'terminating'
  | 'terminated'
  | 'failed'
  | 'archived'

export const ALL_STATUSES: Status[] = [
  'provisioning',
  'booting',
  'starting',
  'ready',
  'unhealthy',
  'draining',
  'terminating',
  'terminated',
  'failed',
  'archived',
]

/** On the way up: shows a progress bar. */
export const STARTING: Status[] = ['provisioning', 'booting', 'starting']
/** The machine exists and is (or may be) billed. */
export const ALIVE: Status[] = ['provisioning', 'booting', 'starting', 'ready', 'unhealthy', 'draining', 'terminating', 'failed']
/** Terminate makes sense. */
export const TERMINABLE: Status[] = ['provisioning', 'booting', 'starting', 'ready', 'unhealthy', 'failed']

export interface Instance {
  id: string
  status: Status
  status_reason: string | null
  status_message: string | null
  progress: number
  provider: string
  zone: string
  instance_type: string
  model: string
  ip: string | null
  provider_instance_id: string | null
  created_at: string
  updated_at: string
  ready_at: string | null
  terminated_at: string | null
  last_heartbeat_at: string | null
  generation: number
  /** The deployment this instance is a replica of (null: created on its own). */
  deployment_id?: string | null
  /** The project it belongs to (teams). */
  project_id?: string
  /** The instance type's price when created (spend; absent on older servers). */
  price_per_hour?: number | null
  /** When the provider made the machine (billing starts). */
  billing_started_at?: string | null
  /** When the provider said it is gone (billing ends). */
  billing_ended_at?: string | null
  /** What it has cost so far, from the billing interval and its price. */
  cost_so_far?: number | null
}

export interface InstanceList {
  instances: Instance[]
}

export interface CreateInstancesBody {
  provider: string
  zone?: string | null
  instance_type: string
  model: string
  count?: number
  project?: string
}

export interface TimelineEntry {
  id: number
  at: string
  kind: string
  action: string
  outcome: string
  from_status: Status | null
  to_status: Status | null
  duration_ms: number | null
  error_code: string | null
  message: string
  metadata: unknown
}

export interface Timeline {
  instance_id: string
  events: TimelineEntry[]
}

export interface SystemSample {
  cpu_pct: number
  load1: number
  load5: number
  load15: number
  mem_used_bytes: number
  mem_total_bytes: number
  disk_used_bytes: number
  disk_total_bytes: number
  net_rx_bps: number
  net_tx_bps: number
}

export interface GpuSample {
  index: number
  name: string
  uuid: string | null
  /** null: unknown (not supported, e.g. under MIG; GPU lost; sample timed out). */
  util_pct: number | null
  mem_used_mib: number
  mem_total_mib: number
  mem_free_mib?: number
  mem_reserved_mib?: number
  temp_c: number | null
  power_w: number | null
  /** The enforced power limit. */
  power_limit_w: number | null
  mig_enabled?: boolean
}

export interface EngineSample {
  status: 'stopped' | 'starting' | 'ready' | 'crashed'
  requests_running: number
  requests_waiting: number
  restarts: number
  /** The engine canary (a real one-token completion); absent while off or the engine is not ready. */
  canary?: CanarySample
}

export interface CanarySample {
  ok: boolean
  checked_at: string
  /** Time to the engine's answer; absent when none came. */
  latency_ms?: number
  /** Why the latest check failed. */
  error?: string
  consecutive_failures: number
}

export interface Sample {
  at: string
  seq: number
  system: SystemSample
  gpu_source: 'nvml' | 'simulated'
  gpus: GpuSample[]
  engine: EngineSample
}

export interface InstanceMetrics {
  instance_id: string
  latest: Sample | null
  samples: Sample[]
  /** History in aligned buckets: present when the query gave from, to or step. */
  series?: MetricSeries
}

type Col = (number | null)[]

/** One instance's history over [from, to): every column has one value per timestamp (null: no sample in the bucket). */
export interface MetricSeries {
  from: string
  to: string
  /** Bucket width actually used, e.g. `5s`, `1m`. */
  step: string
  /** raw, minute or hour. */
  tier: string
  timestamps: string[]
  samples: number[]
  cpu_pct: Col
  cpu_pct_max: Col
  load1: Col
  mem_pct: Col
  disk_pct: Col
  net_rx_bps: Col
  net_tx_bps: Col
  requests_running: Col
  requests_waiting: Col
  /** 0–1. */
  kv_cache_usage: Col
  kv_cache_usage_max: Col
  prompt_tokens_per_s: Col
  generation_tokens_per_s: Col
  ttft_s: Col
  ttft_s_max: Col
  gpus: GpuSeries[]
}

export interface GpuSeries {
  index: number
  util_pct: Col
  util_pct_max: Col
  vram_used_mib: Col
  vram_total_mib: Col
  temp_c: Col
  temp_c_max: Col
  power_w: Col
  power_w_max: Col
  power_limit_w: Col
}

/** `GET /api/v1/metrics/fleet`. */
export interface FleetMetrics {
  now: FleetNow
  series: FleetSeries
}

export interface FleetNow {
  fresh_after: string
  /** Non-terminal instances. */
  instances: number
  reporting_instances: number
  /** GPUs of instances with a fresh heartbeat. */
  gpus: number
  mean_gpu_util_pct: number | null
  vram_used_mib: number
  vram_total_mib: number
  power_w: number
  power_limit_w: number
  by_status: FleetStatus[]
  billable_instances: number
  price_per_hour: { currency: string; amount: number }[]
}

export interface FleetStatus {
  status: Status
  instances: number
  reporting_instances: number
  gpus: number
  mean_gpu_util_pct: number | null
  vram_used_mib: number
  vram_total_mib: number
  power_w: number
}

export interface FleetSeries {
  from: string
  to: string
  step: string
  tier: string
  timestamps: string[]
  instances: (number | null)[]
  gpus: (number | null)[]
  mean_gpu_util_pct: Col
  vram_used_mib: Col
  vram_total_mib: Col
  power_w: Col
}

/** Running totals of one API key or instance (`GET /api/v1/usage`). */
export interface Usage {
  /** The API key id or instance id. */
  id: string
  /** The key's name (keys only). */
  name: string | null
  requests: number
  errors: number
  prompt_tokens: number
  completion_tokens: number
  /** Instances only: requests with no first token within the stall bound, tried elsewhere. */
  stalls: number
  /** Instances only: times the circuit opened (left the router's choice). */
  ejections: number
  /** Instances only: hedged copies of requests sent here. */
  hedges: number
  /** Instances only: streams that broke off here and were continued elsewhere. */
  failovers: number
  updated_at: string
}

export interface UsageReport {
  keys: Usage[]
  instances: Usage[]
}

export interface Zone {
  name: string
  description: string
}

export interface Provider {
  name: string
  zones: Zone[]
  instance_type_count: number
}

export interface InstanceType {
  name: string
  gpu: { model: string; count: number; vram_mib: number; power_limit_w: number }
  vcpus: number
  ram_mib: number
  price_per_hour: number
  currency: string
  zones: string[]
}

export interface Model {
  name: string
  description: string
  min_vram_mib: number
  ready_instances: number
}

// ---------------------------------------------------------------------------
// Deployments: a model's serving declared once (crates/domain/src/deployment.rs).

export interface Placement {
  provider: string
  zone: string
  instance_type: string
}

export interface ReplicaBounds {
  min: number
  max: number
}

export type ScalingMetric = 'requests_in_flight' | 'queue_length' | 'kv_cache_usage' | 'tokens_per_second'

export const SCALING_METRICS: { value: ScalingMetric; label: string; help: string }[] = [
  { value: 'requests_in_flight', label: 'Requests in flight', help: 'Requests through the router, per ready replica.' },
  { value: 'queue_length', label: 'Queue length', help: "Requests waiting in the engine's queue, per ready replica." },
  { value: 'kv_cache_usage', label: 'KV-cache use', help: 'KV-cache use per ready replica, a fraction from 0 to 1.' },
  { value: 'tokens_per_second', label: 'Tokens per second', help: 'Tokens generated per second per ready replica (from the engines).' },
]

export interface Autoscaling {
  metric: ScalingMetric
  /** The figure one replica should carry; above it on average, scale up. */
  target_per_replica: number
  /** A duration such as `30s`, `5m`, `1h`. */
  scale_down_delay: string
}

export type DeploymentState = 'active' | 'deleting' | 'deleted'

export type DeploymentAction =
  | 'created'
  | 'updated'
  | 'delete_requested'
  | 'deleted'
  | 'scale_up'
  | 'scale_down'
  | 'replace'
  | 'fallback'
  | 'desired_changed'
  | 'blocked'

export interface DeploymentStatus {
  /** What the keeper decided: autoscaled, within the bounds. */
  desired: number
  ready: number
  /** Provisioning, booting or starting. */
  starting: number
  unhealthy: number
  draining: number
  /** One line, e.g. "2 of 3 ready; 1 starting in fr-par-2". */
  summary: string
  conditions: string[]
}

export interface Deployment {
  id: string
  name: string
  model: string
  state: DeploymentState
  /** Ordered fallback list. */
  placements: Placement[]
  replicas: ReplicaBounds
  autoscaling: Autoscaling
  scale_to_zero_after: string | null
  engine_args: string[] | null
  status: DeploymentStatus
  generation: number
  created_at: string
  updated_at: string
  delete_requested_at: string | null
  deleted_at: string | null
  project_id?: string
  /** Only in `GET /api/v1/deployments/{id}`: its instances, archived ones left out. */
  instances?: Instance[]
}

export interface CreateDeploymentBody {
  name: string
  model: string
  placements: Placement[]
  replicas: ReplicaBounds
  autoscaling?: Autoscaling
  scale_to_zero_after?: string | null
  engine_args?: string[] | null
  project?: string
}

export interface PatchDeploymentBody {
  name?: string
  replicas?: ReplicaBounds
  autoscaling?: Autoscaling
  scale_to_zero_after?: string
}

export interface DeploymentEvent {
  id: number
  at: string
  action: DeploymentAction
  /** in_progress, success, failed, waiting, info */
  outcome: string
  message: string
  metadata: unknown
}

export interface DeploymentTimeline {
  deployment_id: string
  events: DeploymentEvent[]
}

// ---------------------------------------------------------------------------
// Teams: who is signed in, projects and roles, tokens, API keys, the audit log, spend.

export type Role = 'admin' | 'operator' | 'viewer'
export const ROLES: Role[] = ['admin', 'operator', 'viewer']

export interface User {
  id: string
  email: string
  display_name: string
  has_password: boolean
  sso: boolean
  created_at: string
}

export interface Membership {
  project_id: string
  role: Role
}

/** `GET /api/v1/auth/me`. */
export interface Me {
  kind: 'admin' | 'user'
  user: User | null
  memberships: Membership[]
}

/** `GET /api/v1/auth/providers`. */
export interface AuthProviders {
  password: boolean
  oidc: { name: string; login_url: string } | null
}

export interface Project {
  id: string
  created_at: string
  /** The caller's role (the admin token: admin). */
  role: Role
}

export interface Member {
  user: User
  role: Role
  granted_at: string
  granted_by: string
}

export interface AccessToken {
  id: string
  name: string
  created_at: string
  expires_at: string | null
  last_used_at: string | null
  revoked_at: string | null
}

export interface CreatedAccessToken extends AccessToken {
  /** Shown this once. */
  token: string
}

export interface ApiKey {
  id: string
  name: string
  models: string[] | null
  created_at: string
  revoked_at: string | null
  project_id: string
  /** Requests per minute (null: no limit; absent before key limits landed). */
  rpm?: number | null
  tpm?: number | null
  monthly_budget?: number | null
  spent_this_month?: number | null
}

export interface CreatedApiKey extends ApiKey {
  /** The secret, shown this once. */
  key: string
}

export interface CreateApiKeyBody {
  name: string
  models?: string[] | null
  project?: string
  rpm?: number | null
  tpm?: number | null
  monthly_budget?: number | null
}

export interface PatchApiKeyBody {
  rpm?: number | null
  tpm?: number | null
  monthly_budget?: number | null
}

export type AuditOutcome = 'success' | 'denied' | 'failure'

export interface AuditEntry {
  id: number
  at: string
  actor: { kind: string; id: string | null; name: string }
  action: string
  target: { kind: string; id: string | null }
  project_id: string | null
  outcome: AuditOutcome
  status: number
  message: string
  source_ip: string | null
}

export interface AuditPage {
  entries: AuditEntry[]
  next_before: number | null
}

export interface AuditFilter {
  actor?: string
  action?: string
  target?: string
  project?: string
  outcome?: string
  from?: string
  to?: string
  before?: number
  limit?: number
}

export type SpendGroupBy = 'project' | 'deployment' | 'model' | 'provider'
export type SpendStep = '1h' | '1d'

export interface SpendFigures {
  cost: number
  gpu_hours: number
  /** Hours the instances were billable. */
  instance_hours?: number
  prompt_tokens: number
  completion_tokens: number
  cost_per_million_tokens: number | null
}

export interface SpendGroup extends SpendFigures {
  key: string
  series: { timestamps: string[]; cost: number[] }
}

/** `GET /api/v1/spend`. */
export interface SpendReport {
  from: string
  to: string
  step: string
  group_by: SpendGroupBy
  currency: string
  total: SpendFigures
  /** Most expensive first. */
  groups: SpendGroup[]
  /** Billable instances with no known price: they count 0. */
  unpriced_instances?: number
  /** Billable instances whose type's GPU count is unknown (not in gpu_hours). */
  gpu_count_unknown_instances?: number
}

/** An error the API answered (`{"error": {code, message, field}}`), or a network failure (status 0). */
export class ApiError extends Error {
  readonly status: number
  readonly code: string
  readonly field: string | null

  constructor(status: number, code: string, message: string, field: string | null = null) {
    super(message)
    this.name = 'ApiError'
    this.status = status
    this.code = code
    this.field = field
  }

  get unreachable(): boolean {
    return this.status === 0
  }
}

const TOKEN_KEY = 'gpufleet.adminToken'
/** The console session's CSRF cookie (readable; the session cookie itself is HttpOnly). */
export const CSRF_COOKIE = 'gpufleet_csrf'

export function getToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY)
}

export function setToken(token: string): void {
  sessionStorage.setItem(TOKEN_KEY, token)
}

/** The value of the CSRF cookie, while a console session lasts. */
export function csrfToken(): string | null {
  for (const part of document.cookie.split(';')) {
    const [k, ...v] = part.trim().split('=')
    if (k === CSRF_COOKIE) return v.join('=') || null
  }
  return null
}

/** Which credentials the console holds: the admin token, a session (cookies), or none. */
export function authMode(): 'token' | 'session' | 'none' {
  if (getToken()) return 'token'
  if (csrfToken()) return 'session'
  return 'none'
}

type Listener = () => void
const unauthorizedListeners = new Set<Listener>()

/** Called when the API rejects the credentials, or on sign-out: the app returns to the sign-in page. */
export function onUnauthorized(l: Listener): () => void {
  unauthorizedListeners.add(l)
  return () => unauthorizedListeners.delete(l)
}

const forbiddenListeners = new Set<Listener>()

/** Called when the API refuses a call for the caller's role (403 `forbidden`). */
export function onForbidden(l: Listener): () => void {
  forbiddenListeners.add(l)
  return () => forbiddenListeners.delete(l)
}

/** Forgets the credentials here (the token; a session's cookies are the server's to clear). */
function forget(): void {
  sessionStorage.removeItem(TOKEN_KEY)
  // A session the server no longer knows: drop its CSRF cookie so a reload does not try it again.
  document.cookie = `${CSRF_COOKIE}=; Path=/; Max-Age=0; SameSite=Strict`
  unauthorizedListeners.forEach((l) => l())
}

/** Signs out: ends the session at the server (POST /api/v1/auth/logout), or forgets the admin token. */
export async function signOut(): Promise<void> {
  if (!getToken() && csrfToken()) {
    try {
      await request<void>('POST', '/api/v1/auth/logout')
    } catch {
      // Already gone at the server: the page still returns to sign-in.
    }
  }
  forget()
}

/** The headers that authenticate a request: the admin token, or the session's CSRF echo on writes. */
function authHeaders(method: string, token: string | null): Record<string, string> {
  if (token) return { Authorization: `Bearer ${token}` }
  const csrf = csrfToken()
  if (csrf && method !== 'GET' && method !== 'HEAD') return { 'x-csrf-token': csrf }
  return {}
}

async function errorFrom(resp: Response): Promise<ApiError> {
  let code = 'http_' + resp.status
  let message = `${resp.status} ${resp.statusText}`.trim()
  let field: string | null = null
  try {
    const body = await resp.json()
    if (body && body.error) {
      code = body.error.code ?? code
      message = body.error.message ?? message
      field = body.error.field ?? null
    }
  } catch {
    // not JSON: keep the status line
  }
  if (resp.status === 403 && code !== 'csrf') message = `Not allowed: ${message}`
  return new ApiError(resp.status, code, message, field)
}

async function request<T>(
  method: string,
  path: string,
  body?: unknown,
  signal?: AbortSignal,
  token = getToken(),
  extra: Record<string, string> = {},
): Promise<T> {
  const headers: Record<string, string> = { Accept: 'application/json', ...authHeaders(method, token), ...extra }
  if (body !== undefined) headers['Content-Type'] = 'application/json'
  let resp: Response
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal, credentials: 'same-origin' })
  } catch (e) {
    if (signal?.aborted) throw e
    throw new ApiError(0, 'unreachable', 'The control plane cannot be reached.')
  }
  if (!resp.ok) {
    const err = await errorFrom(resp)
    // Credentials the server no longer accepts: back to sign-in (not for a token being checked, nor the sign-in itself).
    if (resp.status === 401 && token === getToken() && path !== '/api/v1/auth/login') forget()
    // Refused for the role: the roles may have changed since they were read.
    if (resp.status === 403 && err.code === 'forbidden') forbiddenListeners.forEach((l) => l())
    throw err
  }
  if (resp.status === 204) return undefined as T
  const text = await resp.text()
  return (text ? JSON.parse(text) : undefined) as T
}

const enc = encodeURIComponent

export const api = {
  /** Checks a token without storing it. */
  check: (token: string) => request<InstanceList>('GET', '/api/v1/instances?limit=1', undefined, undefined, token),
  instances: (opts: { statuses?: Status[]; includeArchived?: boolean; project?: string | null } = {}, signal?: AbortSignal) => {
    const q = new URLSearchParams()
    if (opts.project) q.set('project', opts.project)
    if (opts.statuses?.length) q.set('status', opts.statuses.join(','))
    if (opts.includeArchived) q.set('include_archived', 'true')
    const qs = q.toString()
    return request<InstanceList>('GET', '/api/v1/instances' + (qs ? '?' + qs : ''), undefined, signal)
  },
  instance: (id: string, signal?: AbortSignal) => request<Instance>('GET', `/api/v1/instances/${enc(id)}`, undefined, signal),
  /** Create instances; the same `idempotencyKey` again makes nothing more (it answers with what the first made). */
  create: (body: CreateInstancesBody, idempotencyKey: string) =>
    request<InstanceList>('POST', '/api/v1/instances', body, undefined, getToken(), { 'Idempotency-Key': idempotencyKey }),
  terminate: (id: string) => request<unknown>('DELETE', `/api/v1/instances/${enc(id)}`),
  archive: (id: string) => request<unknown>('POST', `/api/v1/instances/${enc(id)}/archive`),
  timeline: (id: string, signal?: AbortSignal) => request<Timeline>('GET', `/api/v1/instances/${enc(id)}/events`, undefined, signal),
  metrics: (id: string, limit: number, signal?: AbortSignal) =>
    request<InstanceMetrics>('GET', `/api/v1/instances/${enc(id)}/metrics?limit=${limit}`, undefined, signal),
  /** History over [from, to) in buckets of `step` (plus the newest sample). */
  history: (id: string, from: number, to: number, step: string, signal?: AbortSignal) => {
    const q = new URLSearchParams({ limit: '1', from: new Date(from).toISOString(), to: new Date(to).toISOString(), step })
    return request<InstanceMetrics>('GET', `/api/v1/instances/${enc(id)}/metrics?${q}`, undefined, signal)
  },
  fleetMetrics: (window: string, signal?: AbortSignal) =>
    request<FleetMetrics>('GET', `/api/v1/metrics/fleet?window=${enc(window)}`, undefined, signal),
  usage: (signal?: AbortSignal) => request<UsageReport>('GET', '/api/v1/usage', undefined, signal),
  providers: (signal?: AbortSignal) => request<{ providers: Provider[] }>('GET', '/api/v1/providers', undefined, signal),
  instanceTypes: (provider: string, signal?: AbortSignal) =>
    request<{ provider: string; instance_types: InstanceType[] }>('GET', `/api/v1/providers/${enc(provider)}/instance-types`, undefined, signal),
  models: (signal?: AbortSignal) => request<{ models: Model[] }>('GET', '/api/v1/models', undefined, signal),
  deployments: (opts: { includeDeleted?: boolean; project?: string | null } = {}, signal?: AbortSignal) => {
    const q = new URLSearchParams()
    if (opts.includeDeleted) q.set('include_deleted', 'true')
    if (opts.project) q.set('project', opts.project)
    const qs = q.toString()
    return request<{ deployments: Deployment[] }>('GET', '/api/v1/deployments' + (qs ? '?' + qs : ''), undefined, signal)
  },
  deployment: (id: string, signal?: AbortSignal) => request<Deployment>('GET', `/api/v1/deployments/${enc(id)}`, undefined, signal),
  createDeployment: (body: CreateDeploymentBody) => request<Deployment>('POST', '/api/v1/deployments', body),
  patchDeployment: (id: string, body: PatchDeploymentBody) => request<Deployment>('PATCH', `/api/v1/deployments/${enc(id)}`, body),
  /** 202: its instances drain, then terminate; then it is marked deleted. */
  deleteDeployment: (id: string) => request<Deployment>('DELETE', `/api/v1/deployments/${enc(id)}`),
  /** The timeline, oldest first (at most `limit` entries after `after`). */
  deploymentEvents: (id: string, opts: { after?: number; limit?: number } = {}, signal?: AbortSignal) => {
    const q = new URLSearchParams()
    if (opts.after !== undefined) q.set('after', String(opts.after))
    if (opts.limit !== undefined) q.set('limit', String(opts.limit))
    const qs = q.toString()
    return request<DeploymentTimeline>('GET', `/api/v1/deployments/${enc(id)}/events` + (qs ? '?' + qs : ''), undefined, signal)
  },
  // --- sign-in and accounts
  providersOfSignIn: (signal?: AbortSignal) => request<AuthProviders>('GET', '/api/v1/auth/providers', undefined, signal, null),
  login: (email: string, password: string) => request<Me>('POST', '/api/v1/auth/login', { email, password }, undefined, null),
  me: (signal?: AbortSignal) => request<Me>('GET', '/api/v1/auth/me', undefined, signal),
  projects: (signal?: AbortSignal) => request<Project[]>('GET', '/api/v1/projects', undefined, signal),
  createProject: (id: string) => request<Project>('POST', '/api/v1/projects', { id }),
  members: (project: string, signal?: AbortSignal) => request<Member[]>('GET', `/api/v1/projects/${enc(project)}/members`, undefined, signal),
  grant: (project: string, userId: string, role: Role) => request<Member>('PUT', `/api/v1/projects/${enc(project)}/members/${enc(userId)}`, { role }),
  revokeMember: (project: string, userId: string) => request<void>('DELETE', `/api/v1/projects/${enc(project)}/members/${enc(userId)}`),
  users: (signal?: AbortSignal) => request<User[]>('GET', '/api/v1/users', undefined, signal),
  createUser: (body: { email: string; display_name: string; password?: string }) => request<User>('POST', '/api/v1/users', body),
  tokens: (signal?: AbortSignal) => request<AccessToken[]>('GET', '/api/v1/tokens', undefined, signal),
  createToken: (name: string, expiresInDays?: number) =>
    request<CreatedAccessToken>('POST', '/api/v1/tokens', expiresInDays ? { name, expires_in_days: expiresInDays } : { name }),
  revokeToken: (id: string) => request<void>('DELETE', `/api/v1/tokens/${enc(id)}`),
  // --- API keys of the OpenAI-compatible endpoint
  apiKeys: (project: string | null, signal?: AbortSignal) =>
    request<{ api_keys: ApiKey[] }>('GET', '/api/v1/api-keys' + (project ? `?project=${enc(project)}` : ''), undefined, signal),
  createApiKey: (body: CreateApiKeyBody) => request<CreatedApiKey>('POST', '/api/v1/api-keys', body),
  patchApiKey: (id: string, body: PatchApiKeyBody) => request<ApiKey>('PATCH', `/api/v1/api-keys/${enc(id)}`, body),
  revokeApiKey: (id: string) => request<unknown>('DELETE', `/api/v1/api-keys/${enc(id)}`),
  // --- audit and spend
  audit: (f: AuditFilter, signal?: AbortSignal) => {
    const q = new URLSearchParams()
    for (const [k, v] of Object.entries(f)) if (v !== undefined && v !== null && v !== '') q.set(k, String(v))
    const qs = q.toString()
    return request<AuditPage>('GET', '/api/v1/audit' + (qs ? '?' + qs : ''), undefined, signal)
  },
  spend: (opts: { from: number; to: number; groupBy: SpendGroupBy; step: SpendStep; project?: string | null }, signal?: AbortSignal) => {
    const q = new URLSearchParams({
      from: new Date(opts.from).toISOString(),
      to: new Date(opts.to).toISOString(),
      group_by: opts.groupBy,
      step: opts.step,
    })
    if (opts.project) q.set('project', opts.project)
    return request<SpendReport>('GET', `/api/v1/spend?${q}`, undefined, signal)
  },
}

/** Returns null where the endpoint does not exist yet (404), for features that land later. */
export async function optional<T>(p: Promise<T>): Promise<T | null> {
  try {
    return await p
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return null
    throw e
  }
}

// ---------------------------------------------------------------------------
// The event stream. EventSource cannot send an Authorization header, so the
// stream is read with fetch() and parsed here.

export type StreamEvent =
  | { type: 'snapshot'; instances: Instance[] }
  | { type: 'instance'; instance: Instance }

export type StreamState = 'connecting' | 'live' | 'retrying'

export interface StreamHandlers {
  onEvent: (e: StreamEvent) => void
  onState: (s: StreamState, error?: ApiError) => void
}

/** Splits an SSE byte stream into events (name + data). */
export class SseParser {
  private buf = ''
  private event = ''
  private data: string[] = []
  private readonly emit: (event: string, data: string) => void

  constructor(emit: (event: string, data: string) => void) {
    this.emit = emit
  }

  push(chunk: string): void {
    this.buf += chunk
    let nl: number
    while ((nl = this.buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buf.slice(0, nl)
      const sep = this.buf[nl] === '\r' && this.buf[nl + 1] === '\n' ? 2 : 1
      // A lone \r at the end of the buffer may be the first half of \r\n.
      if (this.buf[nl] === '\r' && nl + 1 === this.buf.length) break
      this.buf = this.buf.slice(nl + sep)
      this.line(line)
    }
  }

  private line(line: string): void {
    if (line === '') {
      if (this.data.length) this.emit(this.event || 'message', this.data.join('\n'))
      this.event = ''
      this.data = []
      return
    }
    if (line.startsWith(':')) return
    const colon = line.indexOf(':')
    const name = colon < 0 ? line : line.slice(0, colon)
    let value = colon < 0 ? '' : line.slice(colon + 1)
    if (value.startsWith(' ')) value = value.slice(1)
    if (name === 'event') this.event = value
    else if (name === 'data') this.data.push(value)
  }
}

/** Follows `GET /api/v1/events`, reconnecting with backoff. Returns a stop function. */
export function followEvents(h: StreamHandlers): () => void {
  let stopped = false
  let ctrl: AbortController | null = null
  let attempt = 0
  let timer: number | undefined

  const run = async () => {
    if (stopped) return
    ctrl = new AbortController()
    h.onState(attempt === 0 ? 'connecting' : 'retrying')
    let failure: ApiError | undefined
    try {
      const token = getToken()
      const resp = await fetch('/api/v1/events', {
        headers: { Accept: 'text/event-stream', ...(token ? { Authorization: `Bearer ${token}` } : {}) },
        signal: ctrl.signal,
        cache: 'no-store',
      })
      if (!resp.ok || !resp.body) {
        failure = await errorFrom(resp)
        if (resp.status === 401) {
          forget()
          return
        }
      } else {
        const parser = new SseParser((event, data) => {
          if (event === 'snapshot' || event === 'resync') {
            attempt = 0
            h.onState('live')
            h.onEvent({ type: 'snapshot', instances: (JSON.parse(data) as InstanceList).instances })
          } else if (event === 'instance') {
            h.onEvent({ type: 'instance', instance: JSON.parse(data) as Instance })
          }
        })
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader()
        for (;;) {
          const { value, done } = await reader.read()
          if (done) break
          parser.push(value)
        }
        failure = new ApiError(0, 'stream_closed', 'The event stream closed.')
      }
    } catch {
      if (stopped) return
      failure = new ApiError(0, 'unreachable', 'The control plane cannot be reached.')
    }
    if (stopped) return
    attempt += 1
    h.onState('retrying', failure)
    // 0.5 s, 1 s, 2 s ... up to 15 s, with jitter.
    const delay = Math.min(15000, 500 * 2 ** Math.min(attempt - 1, 5)) * (0.8 + Math.random() * 0.4)
    timer = window.setTimeout(run, delay)
  }
  run()
  return () => {
    stopped = true
    window.clearTimeout(timer)
    ctrl?.abort()
  }
}
