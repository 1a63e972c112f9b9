// End-to-end test of the console in Debian's headless Chromium, driven by
// playwright-core (which never downloads a browser).
//
//   GPUFLEET_URL=http://127.0.0.1:8080 GPUFLEET_TOKEN=... node e2e/console.e2e.mjs
//
// Optional: CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR (default
// <repo>/target/console-screenshots), E2E_TIMEOUT_MS (per wait, default 90000).
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

await step('sign-in page is shown', async () => {
  await page.goto(BASE + '/')
  await page.getByRole('heading', { name: 'gpufleet' }).waitFor()
  await page.getByLabel('Admin token').waitFor()
  await shot('01-sign-in')
})

await step('a wrong token is refused on the page', async () => {
  allowed = [/status of 401/]
  await page.getByLabel('Admin token').fill('not-the-token')
  await page.getByRole('button', { name: 'Sign in' }).click()
  await page.getByText('This token was not accepted.').waitFor()
  allowed = []
})

await step('sign in with the admin token', async () => {
  await page.getByLabel('Admin token').fill(TOKEN)
  await page.getByRole('button', { name: 'Sign in' }).click()
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
  await page.waitForTimeout(300)
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
  await page.goto(BASE + '/#/')
  await page.getByRole('heading', { name: 'Fleet overview' }).waitFor()
  await page.evaluate(() => document.activeElement instanceof HTMLElement && document.activeElement.blur())
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
  await page.getByLabel('Admin token').waitFor()
  const stored = await page.evaluate(() => Object.values(sessionStorage))
  expect(!stored.includes(TOKEN), 'the token is forgotten')
})

await context.close()
rmSync(profile, { recursive: true, force: true })
check()
log(`console e2e: OK (screenshots in ${SHOTS})`)
