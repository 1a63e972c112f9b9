// End-to-end test of the console in Debian's headless Chromium, driven by
// playwright-core (which never downloads a browser).
//
//   GPUFLEET_URL=http://127.0.0.1:8080 GPUFLEET_TOKEN=... node e2e/console.e2e.mjs
//
// Optional: CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR (default
// <repo>/target/console-screenshots), E2E_TIMEOUT_MS (per wait, default 90000).
// The team journey (single sign-on, password sign-in, roles) runs when
// E2E_PROJECT is set, with the users the Rust test made: E2E_SSO_NAME (the
// issuer's name on the button), E2E_SSO_EMAIL / E2E_SSO_DISPLAY_NAME /
// E2E_SSO_PASSWORD (an admin of the project, signing in at the issuer),
// E2E_PW_EMAIL / E2E_PW_NAME / E2E_PW_PASSWORD (an operator, by password),
// E2E_OTHER_EMAIL (a user with no role yet).
// Exits non-zero on the first failed step, on any page error and on any
// browser console error not deliberately provoked by a step.

import { mkdtempSync, mkdirSync, rmSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium } from 'playwright-core'

const here = dirname(fileURLToPath(import.meta.url))
const BASE = (process.env.GPUFLEET_URL ?? '').replace(/\/$/, '')
const TOKEN = process.env.GPUFLEET_TOKEN ?? ''
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium'
const SHOTS = resolve(process.env.SCREENSHOT_DIR ?? join(here, '..', '..', 'target', 'console-screenshots'))
const WAIT = Number(process.env.E2E_TIMEOUT_MS ?? 90000)
const PROJECT = process.env.E2E_PROJECT ?? ''
const SSO = {
  name: process.env.E2E_SSO_NAME ?? '',
  email: process.env.E2E_SSO_EMAIL ?? '',
  displayName: process.env.E2E_SSO_DISPLAY_NAME ?? '',
  password: process.env.E2E_SSO_PASSWORD ?? '',
}
const PW = { email: process.env.E2E_PW_EMAIL ?? '', name: process.env.E2E_PW_NAME ?? '', password: process.env.E2E_PW_PASSWORD ?? '' }
const OTHER_EMAIL = process.env.E2E_OTHER_EMAIL ?? ''
const TYPE = 'mock-l4-1'
const MODEL = 'gpufleet/sim-small'

if (!BASE || !TOKEN) fail('GPUFLEET_URL and GPUFLEET_TOKEN must be set')
if (!existsSync(CHROMIUM)) fail(`no Chromium at ${CHROMIUM}: install Debian's package (apt-get install -y chromium)`)

function fail(msg) {
  console.error(`console e2e: FAILED: ${msg}`)
  process.exit(1)
}

const started = Date.now()
function log(msg) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(6)} s] ${msg}`)
}

/** Console errors that a step provokes on purpose (e.g. a 400 the page must show), as regexps. */
let allowed = []
const problems = []

mkdirSync(SHOTS, { recursive: true })
const profile = mkdtempSync(join(tmpdir(), 'gpufleet-chromium-'))
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'],
  viewport: { width: 1280, height: 800 },
})
context.setDefaultTimeout(WAIT)
const page = context.pages()[0] ?? (await context.newPage())

page.on('console', (msg) => {
  if (msg.type() !== 'error') return
  const text = msg.text()
  if (allowed.some((re) => re.test(text))) {
    log(`  (expected console message: ${text})`)
    return
  }
  problems.push(`console error: ${text} at ${msg.location().url}:${msg.location().lineNumber}`)
})
page.on('pageerror', (err) => problems.push(`page error: ${err.message}\n${err.stack ?? ''}`))
let navigations = 0
page.on('framenavigated', (f) => {
  if (f === page.mainFrame()) navigations++
})

async function shot(name) {
  const file = join(SHOTS, `${name}.png`)
  await page.screenshot({ path: file, fullPage: true })
  log(`  screenshot ${file}`)
}

function check() {
  if (problems.length) throw new Error(problems.join('\n'))
}

async function step(name, fn) {
  log(name)
  try {
    await fn()
    check()
  } catch (e) {
    const file = join(SHOTS, `failure.png`)
    await page.screenshot({ path: file, fullPage: true }).catch(() => undefined)
    console.error(`console e2e: step "${name}" failed (screenshot ${file}):\n${e.stack ?? e}`)
    if (problems.length) console.error(`browser problems:\n${problems.join('\n')}`)
    await context.close().catch(() => undefined)
    rmSync(profile, { recursive: true, force: true })
    process.exit(1)
  }
}

/** Elements that stick out to the right of the viewport (for a failure message). */
function wide() {
  return page.evaluate(() =>
    [...document.querySelectorAll('body *')]
      .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1)
      .filter((e) => {
        for (let a = e.parentElement; a; a = a.parentElement) if (getComputedStyle(a).overflowX !== 'visible') return false
        return true
      })
      .slice(0, 8)
      .map((e) => `${e.tagName.toLowerCase()}.${e.className} (right ${Math.round(e.getBoundingClientRect().right)})`)
      .join(', '),
  )
}

function expect(cond, msg) {
  if (!cond) throw new Error(msg)
}

const nav = (name) => page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name, exact: true })
// Instances from before this run (none under the Rust test, which starts a fresh control plane).
const before = await fetch(BASE + '/api/v1/instances', { headers: { Authorization: `Bearer ${TOKEN}` } })
  .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`GET /api/v1/instances: ${r.status}`))))
  .then((l) => new Set(l.instances.map((i) => i.id)))
  .catch((e) => fail(`the API does not answer at ${BASE}: ${e.message}`))
const rows = () => page.locator('table[aria-label="Instances"] tbody tr')
let ids = []

await step('sign-in page is shown: email and password, single sign-on, the admin token as a second choice', async () => {
  await page.goto(BASE + '/')
  await page.getByRole('heading', { name: 'gpufleet' }).waitFor()
  await page.getByLabel('Email').waitFor()
  await page.getByLabel('Password').waitFor()
  if (SSO.name) await page.getByRole('link', { name: `Sign in with ${SSO.name}` }).waitFor()
  expect((await page.getByLabel('Admin token').count()) === 0, 'the admin token is not the first choice')
  await shot('01-sign-in')
  await page.getByRole('button', { name: 'Use an admin token instead' }).click()
  await page.getByLabel('Admin token').waitFor()
})

await step('a wrong token is refused on the page', async () => {
  allowed = [/status of 401/]
  await page.getByLabel('Admin token').fill('not-the-token')
  await page.getByRole('button', { name: 'Sign in with the token' }).click()
  await page.getByText('This token was not accepted.').waitFor()
  allowed = []
})

await step('sign in with the admin token', async () => {
  await page.getByLabel('Admin token').fill(TOKEN)
  await page.getByRole('button', { name: 'Sign in with the token' }).click()
  await page.getByRole('heading', { name: 'Fleet overview' }).waitFor()
  await page.getByText('Live', { exact: true }).waitFor()
  expect(!page.url().includes(TOKEN), `the token is in the URL: ${page.url()}`)
  const stored = await page.evaluate(() => Object.values(sessionStorage))
  expect(stored.includes(TOKEN), 'the token is kept in sessionStorage')
  const local = await page.evaluate(() => Object.values(localStorage))
  expect(!local.includes(TOKEN), 'the token is not in localStorage')
  if (before.size === 0) await page.getByText('No instances yet.').waitFor()
  await shot('02-overview-empty')
})

await step('the create page shows the API validation message next to the field', async () => {
  await page.getByRole('link', { name: 'Create instances' }).first().click()
  await page.getByRole('heading', { name: 'Create instances' }).waitFor()
  await page.getByLabel('Provider').selectOption('mock')
  await page.locator(`input[name="instance_type"][value="${TYPE}"]`).check()
  await page.getByLabel('Model').selectOption(MODEL)
  allowed = [/status of 400/]
  await page.getByLabel('Count').fill('0')
  await page.getByRole('button', { name: /^Create/ }).click()
  const err = page.locator('#count-error')
  await err.waitFor()
  expect((await err.textContent()).length > 0, 'the count error has text')
  expect((await page.getByLabel('Count').getAttribute('aria-invalid')) === 'true', 'the count field is marked invalid')
  await shot('03-create-validation')
  allowed = []
})

await step('create two mock instances through the create page', async () => {
  await page.getByLabel('Count').fill('2')
  await page.getByText(/2 × mock-l4-1 = /).waitFor()
  await shot('04-create')
  await page.getByRole('button', { name: 'Create 2 instances' }).click()
  await page.getByRole('heading', { name: 'Instances' }).waitFor()
  await page.getByText('Created 2 instances.', { exact: false }).waitFor()
  await rows().nth(before.size + 1).waitFor()
  ids = (await rows().evaluateAll((trs) => trs.map((tr) => tr.dataset.id))).filter((id) => !before.has(id))
  expect(ids.length === 2, `two new rows, got ${ids}`)
  log(`  created ${ids.join(', ')}`)
})

await step('both reach ready in the live table without a reload', async () => {
  await page.evaluate(() => {
    window.__noReload = true
  })
  const navBefore = navigations
  let sawProgress = false
  const deadline = Date.now() + WAIT
  for (;;) {
    const statuses = await rows().evaluateAll((trs, ids) => trs.filter((tr) => ids.includes(tr.dataset.id)).map((tr) => tr.dataset.status), ids)
    if (!sawProgress) sawProgress = (await page.locator('table [role="progressbar"]').count()) > 0
    if (statuses.length === 2 && statuses.every((s) => s === 'ready')) break
    expect(!statuses.includes('failed'), `an instance failed: ${statuses}`)
    expect(Date.now() < deadline, `not ready in time: ${statuses}`)
    await page.waitForTimeout(200)
  }
  expect(await page.evaluate(() => window.__noReload === true), 'the page was not reloaded')
  expect(navigations === navBefore, 'no navigation happened')
  log(`  progress bar seen while starting: ${sawProgress}`)
  // IP, uptime and cost are filled in.
  const cells = await page.locator(`tr[data-id="${ids[0]}"] td`).allTextContents()
  expect(/\d+\.\d+\.\d+\.\d+/.test(cells.join(' ')), `an IP is shown: ${cells}`)
  expect(/€|EUR/.test(cells.join(' ')), `a cost is shown: ${cells}`)
  await shot('05-instances-ready')
})

await step('the overview counts them', async () => {
  await nav('Overview').click()
  await page.getByRole('heading', { name: 'Fleet overview' }).waitFor()
  if (before.size === 0) await page.getByText('2 ready').waitFor()
  await page.getByText(/\d+ GPUs reporting/).waitFor()
  await page.waitForFunction(() => !document.body.innerText.includes('0 GPUs reporting'))
  // Totals from GET /api/v1/metrics/fleet, price per hour included.
  await page.getByText(/\d+ billable instances?/).waitFor()
  await page.getByText('Mean GPU utilisation, last hour').waitFor()
  await shot('06-overview')
})

await step('observability shows sparklines with heartbeat badges', async () => {
  await nav('Observability').click()
  await page.getByRole('heading', { name: 'Observability' }).waitFor()
  await page.locator('.obs-card').nth(1).waitFor()
  await page.getByText(/♥ fresh/).first().waitFor()
  await page.waitForFunction(() => [...document.querySelectorAll('.obs-card .chart.spark')].some((f) => Number(f.dataset.points) > 1))
  await shot('07-observability')
})

await step('models lists the model as routable, with the router usage', async () => {
  // Traffic through the OpenAI-compatible endpoint, with a fresh API key.
  const created = await fetch(BASE + '/api/v1/api-keys', {
    method: 'POST',
    headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ name: 'console-e2e' }),
  })
  expect(created.ok, `POST /api/v1/api-keys: ${created.status}`)
  const { key } = await created.json()
  let sent = 0
  for (let k = 0; k < 3; k++) {
    const r = await fetch(BASE + '/v1/chat/completions', {
      method: 'POST',
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: MODEL, max_tokens: 4, messages: [{ role: 'user', content: 'one two three' }] }),
    })
    await r.arrayBuffer()
    if (r.ok) sent++
  }
  expect(sent === 3, `3 chat completions answered (${sent})`)
  await nav('Models').click()
  await page.getByRole('heading', { name: 'Models' }).waitFor()
  const row = page.locator(`tr[data-model="${MODEL}"]`)
  await row.getByText('routable', { exact: true }).waitFor()
  // The router flushes its counts every few seconds; the page polls.
  await page.waitForFunction((m) => Number(document.querySelector(`tr[data-model="${m}"] td[data-col="requests"]`)?.textContent?.replace(/\D/g, '')) >= 3, MODEL)
  await page.locator('[data-testid="usage-instances"] tbody tr').first().waitFor()
  await page.locator('[data-testid="usage-keys"]').getByText('console-e2e').waitFor()
  // A rate once two polls are apart.
  await page.waitForFunction((m) => /\d/.test(document.querySelector(`tr[data-model="${m}"] td[data-col="rps"]`)?.textContent ?? ''), MODEL)
  await shot('08-models')
})

await step('open one instance: summary, timeline and a non-empty chart', async () => {
  await nav('Instances').click()
  await page.locator(`tr[data-id="${ids[0]}"] a`).first().click()
  await page.getByRole('heading', { name: 'Timeline' }).waitFor()
  await page.locator('ol.timeline li').first().waitFor()
  const events = await page.locator('ol.timeline li').count()
  expect(events >= 3, `the timeline lists the life so far (${events} entries)`)
  await page.locator('[data-testid="detail-status"] [data-status="ready"]').waitFor()
  // A uPlot chart whose series hold points, drawn on its canvas.
  await page.waitForFunction(() => {
    const el = [...document.querySelectorAll('.chart-canvas')].find((c) => c.uplot)
    if (!el) return false
    const d = el.uplot.data
    return d.length > 1 && d[1].filter((v) => v !== null && v !== undefined).length >= 2
  })
  const drawn = await page.evaluate(() => {
    const el = [...document.querySelectorAll('.chart-canvas')].find((c) => c.uplot && c.uplot.data[1].length >= 2)
    const canvas = el.querySelector('canvas')
    const ctx = canvas.getContext('2d')
    const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data
    let painted = 0
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) painted++
    return { title: el.closest('figure').querySelector('figcaption').textContent, points: el.uplot.data[1].length, painted }
  })
  log(`  chart "${drawn.title}": ${drawn.points} points, ${drawn.painted} painted pixels`)
  expect(drawn.painted > 50, 'the chart canvas has a drawn line')
  const charts = await page.locator('.chart-grid figure').count()
  expect(charts >= 9, `CPU, memory, disk, network, 4 GPU and engine charts (${charts})`)
  // Every window is read from the history API with a step it accepts (a 400 would be a console error).
  for (const [label, bucket] of [
    ['1 h', '15 s'],
    ['24 h', '5 min'],
    ['7 d', '1 h'],
    ['5 m', '5 s'],
  ]) {
    await page.getByRole('radio', { name: label }).click()
    await page.locator('[data-testid="chart-note"]').getByText(`Averages over ${bucket} buckets`).waitFor()
  }
  await page.waitForFunction(() => {
    const el = [...document.querySelectorAll('.chart-canvas')].find((c) => c.uplot)
    return el && el.uplot.data[1].filter((v) => v !== null && v !== undefined).length >= 2
  })
  // The router's figures for this instance (stalls, ejections, hedges, failovers).
  await page.getByRole('heading', { name: 'Routing' }).waitFor()
  await page.locator('[data-testid="routing"]').waitFor()
  // Spend: the price it was created at, and what it cost so far.
  expect(/€|EUR/.test(await page.locator('[data-testid="detail-price"]').textContent()), 'the price per hour is shown')
  expect(/€|EUR/.test(await page.locator('[data-testid="detail-cost"]').textContent()), 'the cost so far is shown')
  await shot('09-instance-detail')
})

await step('terminate it after confirming', async () => {
  await page.locator('.head-actions').getByRole('button', { name: 'Terminate' }).click()
  const dialog = page.getByRole('dialog')
  await dialog.waitFor()
  await shot('10-terminate-confirm')
  await dialog.getByRole('button', { name: 'Terminate' }).click()
  await page.locator('[data-testid="detail-status"] [data-status="terminated"]').waitFor()
  await page.locator('ol.timeline li').filter({ hasText: 'terminated' }).first().waitFor()
})

await step('archive it without a confirmation', async () => {
  await page.locator('.head-actions').getByRole('button', { name: 'Archive' }).click()
  await page.getByText('This instance is archived').waitFor()
  expect((await page.getByRole('dialog').count()) === 0 || !(await page.getByRole('dialog').isVisible()), 'no dialog for archive')
  await shot('11-instance-archived')
})

await step('the instances table drops the archived one and keeps the other', async () => {
  await nav('Instances').click()
  await page.locator(`tr[data-id="${ids[1]}"]`).waitFor()
  await page.locator(`tr[data-id="${ids[0]}"]`).waitFor({ state: 'detached' })
  await shot('12-instances-after')
})

const DEPLOYMENT = 'e2e-sim'
const auth = { headers: { Authorization: `Bearer ${TOKEN}` } }
let deploymentId = null
let replicaId = null

await step('deployments: the create form shows the API field error for min above max', async () => {
  const existing = await fetch(BASE + '/api/v1/deployments', auth).then((r) => r.json())
  await nav('Deployments').click()
  await page.getByRole('heading', { name: 'Deployments', exact: true }).waitFor()
  if (existing.deployments.length === 0) await page.getByText('No deployments yet.').waitFor()
  await page.getByRole('link', { name: 'Create deployment' }).first().click()
  await page.getByRole('heading', { name: 'Create deployment' }).waitFor()
  await page.getByLabel('Name').fill(DEPLOYMENT)
  await page.getByLabel('Model').selectOption(MODEL)
  // One placement: the Mock provider, its first zone and the L4 type, as the catalog lists them.
  const placement = page.locator('[data-testid="placements"] > li').first()
  await placement.getByLabel('Provider').selectOption('mock')
  const zone = placement.getByLabel('Zone')
  await zone.locator('option[value]:not([value=""])').first().waitFor({ state: 'attached' })
  const zones = await zone.locator('option').evaluateAll((os) => os.map((o) => o.value).filter(Boolean))
  expect(zones.length > 0, 'the catalog lists zones for mock')
  await zone.selectOption(zones[0])
  await placement.getByLabel('Instance type').selectOption(TYPE)
  // A second placement can be added and removed again.
  await page.getByRole('button', { name: 'Add a fallback placement' }).click()
  await page.locator('[data-testid="placements"] > li').nth(1).waitFor()
  await page.getByRole('button', { name: 'Remove placement 2' }).click()
  await page.locator('[data-testid="placements"] > li').nth(1).waitFor({ state: 'detached' })
  allowed = [/status of 400/]
  await page.getByLabel('Minimum replicas').fill('3')
  await page.getByLabel('Maximum replicas').fill('1')
  await page.getByRole('button', { name: 'Create deployment' }).click()
  const err = page.locator('#dep-replicas-min-error')
  await err.waitFor()
  const text = await err.textContent()
  expect(/above max/.test(text), `the min error says why: ${text}`)
  expect((await page.getByLabel('Minimum replicas').getAttribute('aria-invalid')) === 'true', 'the min field is marked invalid')
  await shot('12-deployment-form-validation')
  allowed = []
})

await step('create a deployment of 1 replica: it becomes ready, with its instance and a scale-up on the timeline', async () => {
  await page.getByLabel('Minimum replicas').fill('1')
  await page.getByLabel('Maximum replicas').fill('1')
  await page.getByRole('button', { name: 'Create deployment' }).click()
  await page.getByRole('heading', { name: new RegExp(`^${DEPLOYMENT} serves`) }).waitFor()
  deploymentId = page.url().match(/#\/deployments\/(d-[0-9a-f]{32})$/)?.[1]
  expect(deploymentId, `the detail page of the new deployment: ${page.url()}`)
  log(`  created ${deploymentId}`)
  await page.locator('[data-testid="deployment-placements"] li').filter({ hasText: `mock/` }).first().waitFor()
  await page.locator('[data-testid="deployment-replicas"][data-desired="1"][data-ready="1"]').waitFor()
  const row = page.locator('[data-testid="deployment-instances"] tbody tr[data-status="ready"]').first()
  await row.waitFor()
  replicaId = await row.getAttribute('data-id')
  log(`  replica ${replicaId}`)
  await page.locator('[data-testid="deployment-timeline"] li[data-action="scale_up"]').first().waitFor()
  // Newest first.
  const ids = await page.locator('[data-testid="deployment-timeline"] li').evaluateAll((lis) => lis.map((li) => li.getAttribute('data-action')))
  expect(ids[ids.length - 1] === 'created', `the oldest entry (last) is "created": ${ids}`)
  // The replicas chart has points from polling.
  await page.waitForFunction(() => {
    const el = document.querySelector('[data-testid="replicas-chart"] .chart-canvas')
    return el?.uplot && el.uplot.data[0].length >= 2 && el.uplot.data[2].some((v) => v === 1)
  })
  await shot('12-deployment-detail')
})

await step('the replica links to its deployment, in its detail and in the instances table', async () => {
  await page.locator(`[data-testid="deployment-instances"] tr[data-id="${replicaId}"] a`).first().click()
  await page.getByRole('heading', { name: 'Timeline' }).waitFor()
  await page.locator('[data-testid="detail-deployment"]').getByRole('link', { name: DEPLOYMENT }).waitFor()
  await nav('Instances').click()
  await page.locator(`tr[data-id="${replicaId}"] [data-testid="instance-deployment"]`).getByText(DEPLOYMENT).waitFor()
  await page.locator(`tr[data-id="${replicaId}"] [data-testid="instance-deployment"]`).click()
  await page.getByRole('heading', { name: new RegExp(`^${DEPLOYMENT} serves`) }).waitFor()
})

await step('scale: the bounds change through PATCH, min above max is refused next to the field', async () => {
  await page.locator('.head-actions').getByRole('button', { name: 'Scale' }).click()
  const form = page.locator('[data-testid="scale-form"]')
  await form.waitFor()
  allowed = [/status of 400/]
  await form.getByLabel('Minimum replicas').fill('2')
  await form.getByLabel('Maximum replicas').fill('1')
  await form.getByRole('button', { name: 'Apply' }).click()
  await form.locator('#dep-replicas-min-error').waitFor()
  allowed = []
  await form.getByLabel('Minimum replicas').fill('1')
  await form.getByLabel('Maximum replicas').fill('2')
  await form.getByRole('button', { name: 'Apply' }).click()
  await form.waitFor({ state: 'detached' })
  await page.locator('[data-testid="deployment-bounds"]').getByText('1 to 2 replicas').waitFor()
  await page.locator('[data-testid="deployment-timeline"] li[data-action="updated"]').first().waitFor()
})

await step('delete the deployment after confirming: it leaves the list', async () => {
  await page.locator('.head-actions').getByRole('button', { name: 'Delete' }).click()
  const dialog = page.getByRole('dialog')
  await dialog.waitFor()
  await dialog.getByRole('button', { name: 'Delete' }).click()
  await page.getByRole('heading', { name: 'Deployments', exact: true }).waitFor()
  await page.getByText(`Deleting ${DEPLOYMENT}`).waitFor()
  await page.locator(`tr[data-id="${deploymentId}"]`).waitFor({ state: 'detached' })
  // Deleted once its replica has drained and terminated (the list may drop it earlier).
  const until = Date.now() + 30000
  let d
  for (;;) {
    d = await fetch(BASE + `/api/v1/deployments/${deploymentId}`, auth).then((r) => r.json())
    if (d.state === 'deleted' || Date.now() > until) break
    await new Promise((r) => setTimeout(r, 200))
  }
  expect(d.state === 'deleted', `the deployment is deleted: ${d.state}`)
  expect((d.instances ?? []).every((i) => ['terminated', 'archived'].includes(i.status)), `its replicas are gone: ${JSON.stringify(d.instances?.map((i) => i.status))}`)
  // Back where the next steps expect to be: the instances table, the replica terminated in it.
  await nav('Instances').click()
  await page.locator(`tr[data-id="${ids[1]}"]`).waitFor()
  await page.locator(`tr[data-id="${replicaId}"][data-status="terminated"]`).waitFor()
})

await step('a narrow screen stays readable', async () => {
  await page.setViewportSize({ width: 390, height: 844 })
  await page.waitForFunction(() => window.innerWidth === 390)
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
  expect(overflow <= 1, `the page scrolls sideways by ${overflow}px: ${await wide()}`)
  await shot('13-instances-narrow')
  await page.locator(`tr[data-id="${ids[1]}"] a`).first().click()
  await page.getByRole('heading', { name: 'Timeline' }).waitFor()
  await page.waitForFunction(() => [...document.querySelectorAll('.chart-canvas')].some((c) => c.uplot))
  const overflow2 = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
  expect(overflow2 <= 1, `the detail page scrolls sideways by ${overflow2}px: ${await wide()}`)
  await shot('14-detail-narrow')
  await page.setViewportSize({ width: 1280, height: 800 })
})

await step('keyboard: Tab reaches the navigation, shows a focus ring, Enter follows the link', async () => {
  // A reload puts the sequential-focus starting point at the top of the document: after a
  // same-document (hash) navigation Chromium keeps it where the last click was, deep in the page.
  await page.goto(BASE + '/#/')
  await page.reload()
  await page.getByRole('heading', { name: 'Fleet overview' }).waitFor()
  let focused = null
  for (let k = 0; k < 8; k++) {
    await page.keyboard.press('Tab')
    focused = await page.evaluate(() => {
      const el = document.activeElement
      return { tag: el?.tagName, text: el?.textContent?.trim(), outline: el ? getComputedStyle(el).outlineStyle : '' }
    })
    if (focused.tag === 'A' && focused.text === 'Instances') break
  }
  expect(focused.tag === 'A' && focused.text === 'Instances', `Tab reaches the Instances link (last focus ${JSON.stringify(focused)})`)
  expect(focused.outline !== 'none', `the focused link shows a focus ring (${JSON.stringify(focused)})`)
  await shot('15-keyboard-focus')
  await page.keyboard.press('Enter')
  await page.getByRole('heading', { name: 'Instances' }).waitFor()
})

await step('sign out returns to the sign-in page and forgets the token', async () => {
  await page.getByRole('button', { name: 'Sign out' }).click()
  await page.getByLabel('Email').waitFor()
  const stored = await page.evaluate(() => Object.values(sessionStorage))
  expect(!stored.includes(TOKEN), 'the token is forgotten')
})

if (PROJECT) await teamJourney()

await context.close()
rmSync(profile, { recursive: true, force: true })
check()
log(`console e2e: OK (screenshots in ${SHOTS})`)

// ---------------------------------------------------------------------------
// Teams: single sign-on, projects and roles, API keys, the audit log, spend.

async function teamJourney() {
  const header = page.locator('header.top')
  const switcher = header.getByLabel('Project')
  const who = page.locator('[data-testid="who"]')
  const admin = (method, path, body) =>
    fetch(BASE + path, {
      method,
      headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then(async (r) => {
      const text = await r.text()
      expect(r.ok, `${method} ${path}: ${r.status} ${text}`)
      return text ? JSON.parse(text) : null
    })
  const dialogConfirm = async (name) => {
    const dialog = page.getByRole('dialog')
    await dialog.waitFor()
    await dialog.getByRole('button', { name }).click()
    await dialog.waitFor({ state: 'hidden' })
  }
  const isIssuer = (u) => new URL(u).origin !== new URL(BASE).origin

  await step('single sign-on: the issuer\'s form, then back on the page it started from, signed in', async () => {
    await page.goto(BASE + '/#/instances')
    await page.getByLabel('Email').waitFor()
    // The issuer is another origin (its own port), which serves no favicon.
    allowed = [/status of 404/]
    await page.getByRole('link', { name: `Sign in with ${SSO.name}` }).click()
    await page.waitForURL((u) => isIssuer(u.href))
    await page.getByLabel('Username').fill(SSO.email)
    await page.getByLabel('Password').fill(SSO.password)
    await shot('20-sso-issuer')
    await page.getByRole('button', { name: 'Sign in' }).click()
    await page.waitForURL((u) => !isIssuer(u.href))
    await page.getByRole('heading', { name: 'Instances', exact: true }).waitFor()
    allowed = []
    expect(new URL(page.url()).hash === '#/instances', `back where the sign-in started: ${page.url()}`)
    await who.getByText(SSO.displayName).waitFor()
    const cookies = await context.cookies(BASE)
    const session = cookies.find((c) => c.name === 'gpufleet_session')
    expect(session && session.httpOnly, `an HttpOnly session cookie: ${JSON.stringify(cookies.map((c) => c.name))}`)
    expect(cookies.some((c) => c.name === 'gpufleet_csrf' && !c.httpOnly), 'a CSRF cookie the page can read')
    const stored = await page.evaluate(() => Object.values(sessionStorage))
    expect(!stored.includes(TOKEN), 'no admin token in this tab')
  })

  await step('the header lists the project with the role; choosing it scopes the instances', async () => {
    await switcher.locator(`option[value="${PROJECT}"]`).waitFor({ state: 'attached' })
    const label = await switcher.locator(`option[value="${PROJECT}"]`).textContent()
    expect(label.includes('admin'), `the role is shown: ${label}`)
    expect((await switcher.locator('option').count()) === 2, 'All projects and the one project of this user')
    await switcher.selectOption(PROJECT)
    await page.locator('[data-testid="project-scope"]').getByText(`Project ${PROJECT} only`).waitFor()
    // The admin token's instances are in `default`: none here.
    await page.getByText('No instances yet.').waitFor()
    // An admin of the project may create.
    await page.getByRole('link', { name: 'Create instances' }).waitFor()
    await shot('21-sso-signed-in')
  })

  await step('API keys: one made in the project shows its secret once, then is revoked', async () => {
    await nav('API keys').click()
    await page.getByRole('heading', { name: 'API keys', exact: true }).waitFor()
    await page.getByRole('button', { name: 'Create API key' }).click()
    const form = page.locator('[data-testid="key-form"]')
    await form.getByLabel('Name').fill('ada-notebook')
    expect((await form.getByLabel('Project').inputValue()) === PROJECT, 'the project defaults to the header\'s')
    await form.getByRole('button', { name: 'Create key' }).click()
    const secret = page.locator('[data-testid="secret-once"]')
    await secret.waitFor()
    const value = await secret.getByRole('textbox').inputValue()
    expect(/^gfk_[0-9a-f]{64}$/.test(value), `the key's secret is shown: ${value.slice(0, 8)}…`)
    await secret.getByRole('button', { name: 'Copy' }).waitFor()
    const row = page.locator('table[aria-label="API keys"] tr[data-name="ada-notebook"]')
    await row.waitFor()
    expect((await row.locator('td[data-label="Project"]').textContent()) === PROJECT, 'the key is in the project')
    const keys = await page.evaluate(() => fetch('/api/v1/api-keys').then((r) => r.json()))
    const key = keys.api_keys.find((k) => k.name === 'ada-notebook')
    if (key && 'rpm' in key) {
      await row.getByRole('button', { name: 'Edit limits of ada-notebook' }).click()
      const lf = page.locator('[data-testid="limits-form"]')
      await lf.getByLabel('Requests per minute').fill('60')
      await lf.getByLabel(/Monthly budget/).fill('25')
      await lf.getByRole('button', { name: 'Save limits' }).click()
      await lf.waitFor({ state: 'detached' })
      await row.locator('td[data-label="RPM"]').getByText('60').waitFor()
      log('  limits edited (PATCH)')
    } else {
      log('  (this server has no key limits yet: editing limits not exercised)')
    }
    await shot('22-api-keys')
    await secret.getByRole('button', { name: 'Done' }).click()
    await row.getByRole('button', { name: 'Revoke ada-notebook' }).click()
    await dialogConfirm('Revoke')
    await row.waitFor({ state: 'detached' })
    await page.getByLabel(/Show revoked keys/).check()
    await row.locator('td[data-label="Revoked"]').filter({ hasText: /\d/ }).waitFor()
  })

  await step('projects: members listed; a role granted by email, changed, revoked', async () => {
    await nav('Projects').click()
    await page.getByRole('heading', { name: 'Projects', exact: true }).waitFor()
    const card = page.locator(`article[data-project="${PROJECT}"]`)
    const members = card.getByRole('table', { name: `Members of ${PROJECT}` })
    await members.locator(`tr[data-user="${SSO.email}"]`).waitFor()
    await members.locator(`tr[data-user="${PW.email}"]`).waitFor()
    expect((await members.locator(`tr[data-user="${PW.email}"] td[data-label="Granted by"]`).textContent()).length > 0, 'granted by is shown')
    const grant = card.getByRole('form', { name: `Grant a role in ${PROJECT}` })
    const userSelect = grant.getByLabel('User')
    await userSelect.locator('option', { hasText: OTHER_EMAIL }).waitFor({ state: 'attached' })
    await userSelect.selectOption(await userSelect.locator('option', { hasText: OTHER_EMAIL }).getAttribute('value'))
    await grant.getByLabel('Role').selectOption('viewer')
    await grant.getByRole('button', { name: 'Grant role' }).click()
    const carol = members.locator(`tr[data-user="${OTHER_EMAIL}"]`)
    await carol.waitFor()
    expect((await carol.getByLabel(`Role of ${OTHER_EMAIL}`, { exact: true }).inputValue()) === 'viewer', 'granted viewer')
    await carol.getByLabel(`Role of ${OTHER_EMAIL}`, { exact: true }).selectOption('operator')
    await page.waitForFunction(
      async ([p, email]) => {
        const ms = await fetch(`/api/v1/projects/${p}/members`).then((r) => r.json())
        return ms.some((m) => m.user.email === email && m.role === 'operator')
      },
      [PROJECT, OTHER_EMAIL],
    )
    await shot('25-projects')
    await carol.getByRole('button', { name: `Revoke the role of ${OTHER_EMAIL}` }).click()
    await dialogConfirm('Revoke')
    await carol.waitFor({ state: 'detached' })
  })

  await step('audit: a project admin reads the project\'s entries and their own sign-in, with outcomes', async () => {
    await nav('Audit').click()
    await page.getByRole('heading', { name: 'Audit log' }).waitFor()
    const table = page.getByRole('table', { name: 'Audit log' })
    await table.locator('tr[data-action="api_key.create"][data-outcome="success"]').first().waitFor()
    await table.locator('tr[data-action="member.grant"]').first().waitFor()
    await table.locator('tr[data-action="member.revoke"]').first().waitFor()
    // Filter by action prefix.
    await page.getByLabel('Action').fill('member.')
    await page.getByRole('button', { name: 'Apply filters' }).click()
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('table[aria-label="Audit log"] tbody tr')]
      return rows.length > 0 && rows.every((r) => r.dataset.action.startsWith('member.'))
    })
    await shot('23-audit')
    // Their own sign-in belongs to no project: it is there with every
    // project, not under the header's one.
    const filters = page.getByRole('search', { name: 'Audit filters' })
    await filters.getByLabel('Action').fill('auth.')
    await filters.getByLabel('Project').selectOption('')
    await page.getByRole('button', { name: 'Apply filters' }).click()
    await table.locator('tr[data-action="auth.sign_in"][data-outcome="success"]').filter({ hasText: SSO.email }).first().waitFor()
    await page.getByRole('button', { name: 'Clear' }).click()
  })

  await step('spend: the range, grouping and step; the total, or the honest empty state', async () => {
    allowed = [/status of 404/]
    await nav('Spend').click()
    await page.getByRole('heading', { name: 'Spend', exact: true }).waitFor()
    await page.getByRole('radio', { name: 'Last 7 d' }).click()
    await page.getByLabel('Group by').selectOption('model')
    const total = page.locator('[data-testid="spend-total"]')
    const missing = page.getByText('Spend reporting is not available on this control plane.')
    await total.or(missing).first().waitFor()
    if (await missing.isVisible()) log('  (this server has no spend API yet: the page says so)')
    else {
      await total.getByText('Total cost').waitFor()
      await page
        .getByRole('table', { name: 'Spend by model' })
        .or(page.getByText('Nothing was spent in this range.'))
        .first()
        .waitFor()
    }
    await shot('24-spend')
    allowed = []
  })

  await step('account: a personal access token, shown once, then revoked', async () => {
    await who.click()
    await page.getByRole('heading', { name: 'Your account' }).waitFor()
    await page.locator('[data-testid="account-summary"]').getByText(`admin in ${PROJECT}`).waitFor()
    await page.getByLabel('Name').fill('ada-cli')
    await page.getByRole('button', { name: 'Create token' }).click()
    const secret = page.locator('[data-testid="secret-once"]')
    const value = await secret.getByRole('textbox').inputValue()
    expect(/^gfp_/.test(value), `the token is shown once: ${value.slice(0, 6)}…`)
    // It works as a bearer token.
    const me = await fetch(BASE + '/api/v1/auth/me', { headers: { Authorization: `Bearer ${value}` } }).then((r) => r.json())
    expect(me.user?.email === SSO.email, `the token acts as its user: ${JSON.stringify(me)}`)
    const row = page.getByRole('table', { name: 'Access tokens' }).locator('tr').filter({ hasText: 'ada-cli' })
    await row.waitFor()
    await shot('26-account')
    await row.getByRole('button', { name: 'Revoke token ada-cli' }).click()
    await dialogConfirm('Revoke')
    await row.locator('td').nth(4).filter({ hasText: /\d/ }).waitFor()
  })

  await step('sign out ends the session at the server and returns to the sign-in page', async () => {
    // Polls in flight when the session ends may be answered 401.
    allowed = [/status of 401/]
    await page.getByRole('button', { name: 'Sign out' }).click()
    await page.getByLabel('Email').waitFor()
    const status = await page.evaluate(() => fetch('/api/v1/auth/me').then((r) => r.status))
    expect(status === 401, `the session is over at the server (${status})`)
    allowed = []
  })

  await step('password sign-in: a wrong password is refused, the right one signs in', async () => {
    allowed = [/status of 401/]
    await page.getByLabel('Email').fill(PW.email)
    await page.getByLabel('Password').fill('not-the-password')
    await page.getByRole('button', { name: 'Sign in', exact: true }).click()
    await page.getByText('Wrong email or password.').waitFor()
    allowed = []
    await page.getByLabel('Password').fill(PW.password)
    await page.getByRole('button', { name: 'Sign in', exact: true }).click()
    // Signed in where the page was (the previous user's account page: now this user's).
    await who.getByText(PW.name).waitFor()
    await page.getByRole('heading', { name: 'Your account' }).waitFor()
    await page.locator('[data-testid="account-summary"]').getByText(`operator in ${PROJECT}`).waitFor()
    await switcher.locator(`option[value="${PROJECT}"]`).waitFor({ state: 'attached' })
    await switcher.selectOption(PROJECT)
    await nav('API keys').click()
    await page.getByRole('heading', { name: 'API keys', exact: true }).waitFor()
    await shot('27-password-operator')
  })

  await step('a write the role no longer allows is refused with a clear message', async () => {
    // An operator may create keys: the form is offered...
    await page.getByRole('button', { name: 'Create API key' }).click()
    const form = page.locator('[data-testid="key-form"]')
    await form.getByLabel('Name').fill('bob-key')
    // ...but a project admin makes them a viewer meanwhile; the server decides.
    const users = await admin('GET', '/api/v1/users')
    const bob = users.find((u) => u.email === PW.email)
    await admin('PUT', `/api/v1/projects/${PROJECT}/members/${bob.id}`, { role: 'viewer' })
    allowed = [/status of 403/]
    await form.getByRole('button', { name: 'Create key' }).click()
    await form.getByText(/Not allowed: .*viewer.* does not allow this/).waitFor()
    allowed = []
    // The refusal makes the page read the roles again: the header says viewer.
    await switcher.locator(`option[value="${PROJECT}"]`).filter({ hasText: 'viewer' }).waitFor({ state: 'attached' })
    await page.getByText('Your role here does not allow managing API keys').waitFor()
    await shot('28-viewer-refused')
    // With the new role read, the page no longer offers it.
    await page.reload()
    await page.getByRole('heading', { name: 'API keys', exact: true }).waitFor()
    await page.getByText('Your role here does not allow managing API keys').waitFor()
    expect((await page.getByRole('button', { name: 'Create API key' }).count()) === 0, 'no create for a viewer')
    await nav('Instances').click()
    await page.getByRole('heading', { name: 'Instances', exact: true }).waitFor()
    expect((await page.getByRole('link', { name: 'Create instances' }).count()) === 0, 'no create for a viewer')
    allowed = [/status of 401/]
    await page.getByRole('button', { name: 'Sign out' }).click()
    await page.getByLabel('Email').waitFor()
    allowed = []
  })

  await step('the admin token reads every sign-in in the audit log, older pages too', async () => {
    await page.getByRole('button', { name: 'Use an admin token instead' }).click()
    await page.getByLabel('Admin token').fill(TOKEN)
    await page.getByRole('button', { name: 'Sign in with the token' }).click()
    await who.getByText('Admin token').waitFor()
    await nav('Audit').click()
    await page.getByRole('heading', { name: 'Audit log' }).waitFor()
    await page.getByLabel('Action').fill('auth.sign_in')
    await page.getByRole('button', { name: 'Apply filters' }).click()
    const table = page.getByRole('table', { name: 'Audit log' })
    await table.locator('tr[data-outcome="success"]').filter({ hasText: SSO.email }).filter({ hasText: 'single sign-on' }).first().waitFor()
    await table.locator('tr[data-outcome="success"]').filter({ hasText: PW.email }).first().waitFor()
    await table.locator('tr[data-outcome="denied"]').filter({ hasText: PW.email }).first().waitFor()
    await shot('29-audit-admin')
    // Paging: 10 per page, then the older ones.
    await page.getByLabel('Action').fill('')
    await page.getByLabel('Per page').selectOption('10')
    await page.getByRole('button', { name: 'Apply filters' }).click()
    await page.waitForFunction(() => document.querySelectorAll('table[aria-label="Audit log"] tbody tr').length === 10)
    const newest = await table.locator('tbody tr').first().getAttribute('data-id')
    await page.getByRole('button', { name: 'Show older entries' }).click()
    await page.waitForFunction(() => document.querySelectorAll('table[aria-label="Audit log"] tbody tr').length > 10)
    const ids = await table.locator('tbody tr').evaluateAll((trs) => trs.map((tr) => Number(tr.dataset.id)))
    expect(String(ids[0]) === newest && ids.every((id, i) => i === 0 || id < ids[i - 1]), `newest first, no repeats: ${ids}`)
    // A narrow screen: the filters stack, the table becomes cards, nothing scrolls sideways.
    await page.setViewportSize({ width: 390, height: 844 })
    for (const name of ['Audit', 'API keys', 'Projects']) {
      await nav(name).click()
      await page.getByRole('heading', { level: 1 }).first().waitFor()
      await page.waitForFunction(() => !document.querySelector('.loading'))
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
      expect(overflow <= 1, `${name} scrolls sideways by ${overflow}px on a narrow screen: ${await wide()}`)
    }
    await shot('31-projects-narrow')
    await page.setViewportSize({ width: 1280, height: 800 })
    await nav('Audit').click()
    await page.getByRole('button', { name: 'Clear' }).click()
  })

  await step('spend for every project: a chart of cost per bucket, a table per project, the total', async () => {
    await nav('Spend').click()
    await page.getByRole('heading', { name: 'Spend', exact: true }).waitFor()
    await page.getByRole('radio', { name: 'Last 24 h' }).click()
    await page.getByLabel('Group by').selectOption('project')
    const row = page.getByRole('table', { name: 'Spend by project' }).locator('tr[data-group="default"]')
    await row.waitFor()
    const cost = await row.locator('td[data-label="Cost"]').textContent()
    expect(/[1-9]/.test(cost), `the instances of the first journey cost something: ${cost}`)
    await page.waitForFunction(() => {
      const el = document.querySelector('[data-testid="spend-chart"] .chart-canvas')
      return el?.uplot && el.uplot.data.length > 1 && el.uplot.data[1].some((v) => v > 0)
    })
    await page.locator('[data-testid="spend-total"]').getByText('Total cost').waitFor()
    await shot('30-spend-admin')
    await page.getByRole('button', { name: 'Sign out' }).click()
    await page.getByLabel('Email').waitFor()
  })
}
