// Drives the operator's page (/admin/) in headless Chromium as an operator
// would, against the real stack that tests/browser/run.sh started (with
// ADMIN_TOKEN set). Every wait is on a condition with a deadline. One
// PASS/FAIL line per scenario, then `browser (admin): N passed, M failed`;
// exit 1 on any failure. The scenarios build on each other (one checkout,
// cancelled, then restarted): a later one names the earlier it needs.
//
// Environment: BASE_URL, ADMIN_TOKEN (the token itself, without its label),
// ARTIFACTS (screenshot folder), CHROMIUM.

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Failure, check, eventually as until, launch, runScenarios } from './harness.mjs';

const BASE = process.env.BASE_URL;
const TOKEN = process.env.ADMIN_TOKEN;
const ARTIFACTS = process.env.ARTIFACTS;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const DESKTOP = { width: 1280, height: 800 };
const WORKERS = 3;
const KEY = 'widget-admin-token'; // the page's sessionStorage key
if (!BASE || !TOKEN || !ARTIFACTS) {
  console.error('BASE_URL, ADMIN_TOKEN and ARTIFACTS must be set (run tests/browser/run.sh)');
  process.exit(2);
}

const browser = await launch(CHROMIUM, DESKTOP);
const { context, page } = browser;

/** Waits for, then drops, the console error a refusal the scenario
 * provoked leaves (Chromium logs a 4xx answer to a fetch as "Failed to
 * load resource: ... status of 401 (Unauthorized)"). */
async function expectRefusal(status) {
  const mine = (p) => p.startsWith('console: ') && p.includes(`status of ${status} `);
  await eventually(`the browser reported the expected ${status}`, async () => browser.problems.some(mine), 10000);
  browser.forget(mine);
}

/** `eventually` with this suite's longer default deadline. */
const eventually = (what, probe, timeoutMs = 30000, intervalMs = 100) => until(what, probe, timeoutMs, intervalMs);

async function apiJson(p) {
  const r = await page.request.get(BASE + p);
  check(r.ok(), `GET ${p}: ${r.status()}`);
  return r.json();
}
const inventory = async () => (await apiJson('/product')).inventory;

const text = async (selector) => ((await page.locator(selector).textContent()) ?? '').trim();
const storedToken = () => page.evaluate((k) => sessionStorage.getItem(k), KEY);

/** The "All workflows" row of workflow `id`. */
const listRow = (id) => page.locator(`#all tbody tr.row[data-id="${id}"]`);
/** What the list shows of workflow `id`: { kind, status }, or null. */
async function listed(id) {
  const row = listRow(id);
  if ((await row.count()) !== 1) return null;
  return { kind: (await row.locator('td').nth(1).textContent()).trim(), status: (await row.locator('.status').textContent()).trim() };
}
/** The detail panel as shown: { title, facts: {Kind: ..., Status: ...}, steps: [{seq, name, output}], input }. */
async function detail() {
  return page.evaluate(() => {
    const facts = {};
    for (const dt of document.querySelectorAll('#facts dt')) facts[dt.textContent] = dt.nextElementSibling.textContent;
    const steps = [...document.querySelectorAll('#steps tbody tr')].map((tr) => ({
      seq: Number(tr.cells[0].textContent), name: tr.cells[1].textContent, output: tr.cells[4].textContent,
    }));
    return {
      visible: !document.getElementById('detail').hidden,
      title: document.getElementById('detail-title').textContent,
      facts, steps, input: document.getElementById('input').textContent,
    };
  });
}

/** As an operator does: reload the list (the page's Filter button, no
 * filter set) and click the workflow's row, waiting for both answers. */
async function reopen(id) {
  await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/admin/workflows?limit=50'), { timeout: 30000 }),
    page.locator('#filters button[type=submit]').click(),
  ]);
  const row = listRow(id);
  await row.waitFor({ state: 'attached', timeout: 30000 });
  await Promise.all([
    page.waitForResponse((r) => r.url().endsWith(`/admin/workflows/${id}`), { timeout: 30000 }),
    row.click(),
  ]);
}

/** Reopens workflow `id` until `ready(detail, listed)` holds; returns the detail. */
async function untilShown(id, what, ready, timeoutMs = 60000) {
  let seen = null;
  await eventually(what, async () => {
    await reopen(id);
    // The answers are in; the page writes them in a task of its own.
    const d = await eventually('the detail panel shows it', async () => {
      const d = await detail();
      return d.visible && d.title === `Workflow ${id}` ? d : null;
    }, 10000, 50);
    const l = await listed(id);
    seen = { detail: d, listed: l };
    return ready(d, l) ? d : null;
  }, timeoutMs, 500).catch((e) => {
    throw new Failure(`${e.message}; last shown: ${JSON.stringify(seen)}`);
  });
  return seen.detail;
}

async function signedInState() {
  return {
    signIn: await page.locator('#sign-in').isVisible(),
    lists: await page.locator('#lists').isVisible(),
    signOut: await page.locator('#sign-out').isVisible(),
  };
}

async function workerRows() {
  return page.locator('#workers tbody tr').evaluateAll((trs) => trs.map((tr) => ({
    id: tr.cells[0].textContent, host: tr.cells[1].textContent, pid: tr.cells[2].textContent,
  })));
}
/** Waits for the Workers table to list the live fleet (the public
 * /workers ids), each with this host's name and the pid of a running
 * widget-worker process. */
async function fleetShown() {
  return eventually(`the Workers table lists the ${WORKERS} live workers with host and pid`, async () => {
    const rows = await workerRows();
    const live = (await apiJson('/workers')).map((w) => w.id).sort();
    if (rows.length !== WORKERS || JSON.stringify(rows.map((w) => w.id).sort()) !== JSON.stringify(live)) return null;
    for (const w of rows) {
      if (w.host !== os.hostname() || !/^[1-9][0-9]*$/.test(w.pid)) return null;
      const comm = fs.readFileSync(`/proc/${w.pid}/comm`, 'utf8').trim();
      if (comm !== 'widget-worker') return null;
    }
    return rows;
  }, 30000, 250);
}

/** The input of workflow `id` as the admin API gives it (the page's token). */
async function apiInput(id) {
  const r = await page.request.get(`${BASE}/admin/workflows/${id}`, { headers: { authorization: `Bearer ${TOKEN}` } });
  check(r.ok(), `GET /admin/workflows/${id}: ${r.status()}`);
  return JSON.stringify((await r.json()).workflow.input);
}

async function shot(name, options = {}) {
  await page.screenshot({ path: path.join(ARTIFACTS, name), ...options });
}

// What the scenarios hand on to each other.
const state = { checkoutId: null, orderId: null, stockBefore: null, restartedId: null };
function needs(field, scenario) {
  check(state[field] !== null, `needs scenario ${scenario}, which did not get that far`);
  return state[field];
}

const scenarios = [];
function scenario(title, body) { scenarios.push({ title, body }); }

scenario('sign in: the form first; a wrong token refused with a message; the right one shows workflows and the fleet', async () => {
  await page.goto(`${BASE}/admin/`, { waitUntil: 'load' });
  await page.locator('#sign-in').waitFor({ state: 'visible', timeout: 30000 });
  check((await text('#sign-in-title')) === 'Sign in', 'sign-in heading');
  check(JSON.stringify(await signedInState()) === JSON.stringify({ signIn: true, lists: false, signOut: false }),
    `signed out at first: ${JSON.stringify(await signedInState())}`);
  check((await storedToken()) === null, 'no token stored at first');
  await shot('admin-1-sign-in.png');

  // A wrong token (long enough for the form's own check).
  await page.locator('#token').fill('not-the-admin-token-0123456789');
  await page.locator('#token-form button[type=submit]').click();
  await eventually('the refusal shown', async () =>
    (await text('#sign-in-msg')) === 'That token was refused; sign in again.'
      && (await page.locator('#sign-in-msg').getAttribute('class')).split(' ').includes('error'));
  check(JSON.stringify(await signedInState()) === JSON.stringify({ signIn: true, lists: false, signOut: false }),
    `still signed out after a wrong token: ${JSON.stringify(await signedInState())}`);
  check((await storedToken()) === null, 'the wrong token is not kept');
  check((await page.locator('#token').inputValue()) === '', 'the token field is cleared');
  await shot('admin-1-wrong-token.png');
  await expectRefusal(401);

  // The right one, submitted with Enter.
  await page.locator('#token').fill(TOKEN);
  await page.locator('#token').press('Enter');
  await page.locator('#lists').waitFor({ state: 'visible', timeout: 30000 });
  check(JSON.stringify(await signedInState()) === JSON.stringify({ signIn: false, lists: true, signOut: true }),
    `signed in: ${JSON.stringify(await signedInState())}`);
  check((await text('#who')) === 'Signed in', 'header says signed in');
  for (const h of ['Needs attention', 'All workflows', 'Workers']) {
    check(await page.getByRole('heading', { name: h, exact: true }).isVisible(), `"${h}" shown`);
  }
  const fleet = await fleetShown();
  await eventually('the attention list loaded', async () => (await page.locator('#attention tbody tr').count()) > 0);
  check((await text('#list-msg')) === '', `no list error: ${await text('#list-msg')}`);
  console.log(`      workers: ${fleet.map((w) => `${w.host}/${w.pid}`).join(', ')}`);
  await shot('admin-1-signed-in.png', { fullPage: true });
});

scenario('a checkout made through the API shows waiting; its row opens its steps and input', async () => {
  check(await page.locator('#lists').isVisible(), 'needs scenario 1 (signed in)');
  state.stockBefore = await inventory();
  check(state.stockBefore > 0, `stock to buy from: ${state.stockBefore}`);
  const key = `admin-browser-${crypto.randomBytes(8).toString('hex')}`;
  const requestId = `admin-browser-req-${crypto.randomBytes(4).toString('hex')}`;
  const r = await page.request.post(`${BASE}/checkout/${key}`, { headers: { 'x-request-id': requestId }, timeout: 70000 });
  check(r.status() === 200, `POST /checkout/${key}: ${r.status()} ${await r.text()}`);
  check((r.headers()['content-type'] ?? '').startsWith('text/plain'), `payment id as text/plain: ${r.headers()['content-type']}`);
  const paymentId = await r.text();
  check(paymentId === key, `the payment id is the checkout's key: ${paymentId}`);
  state.checkoutId = key;
  check((await inventory()) === state.stockBefore - 1, 'one unit reserved');

  const d = await untilShown(key, 'the checkout listed as waiting in "All workflows" and its detail open',
    (d, l) => l && l.status === 'waiting' && d.facts.Status === 'waiting');
  check((await listed(key)).kind === 'checkout', 'listed as a checkout');
  check(await listRow(key).evaluate((tr) => tr.classList.contains('selected')), 'its row marked selected');
  check(d.facts.Kind === 'checkout', `detail kind: ${d.facts.Kind}`);
  check(d.facts['Waits for'].startsWith('payment_status until '), `waits for the payment: ${d.facts['Waits for']}`);
  const names = d.steps.map((s) => s.name);
  // Then the engine's own checkpoint of the payment wait's deadline.
  check(JSON.stringify(names.slice(0, 2)) === JSON.stringify(['reserve_inventory', 'create_order'])
      && !names.includes('$ending') && !names.includes('cancel_order'),
    `steps so far reserve_inventory, create_order: ${JSON.stringify(names)}`);
  state.orderId = Number(d.steps[1].output);
  check(Number.isInteger(state.orderId) && state.orderId > 0, `create_order's output is the order id: ${d.steps[1].output}`);
  const input = JSON.parse(d.input);
  check(input.product_id === 1 && input.request_id === requestId, `input shown: ${d.input}`);
  check((await apiJson(`/order/${state.orderId}`)).status === 'PENDING', 'the order is PENDING');
  check(await page.locator('#do-cancel').isEnabled(), 'Cancel enabled for a waiting workflow');
  check(await page.locator('#do-resume').isDisabled(), 'Resume disabled for a waiting workflow');
  await shot('admin-2-waiting.png', { fullPage: true });
});

scenario('Cancel from the detail: reported; ends cancelled after $ending and cancel_order; order CANCELLED, stock back', async () => {
  const id = needs('checkoutId', 2);
  const orderId = needs('orderId', 2);
  await page.locator('#do-cancel').click();
  await eventually('the cancel reported', async () =>
    (await text('#action-msg')) === 'Cancel delivered: the workflow undoes its steps, then ends cancelled.');
  const d = await untilShown(id, 'the workflow cancelled, its compensation run',
    (d, l) => l && l.status === 'cancelled' && d.facts.Status === 'cancelled'
      && d.steps.some((s) => s.name === 'cancel_order'), 90000);
  const names = d.steps.map((s) => s.name);
  const ending = names.indexOf('$ending');
  check(JSON.stringify(names.slice(0, 2)) === JSON.stringify(['reserve_inventory', 'create_order'])
      && ending >= 2 && names.indexOf('cancel_order') > ending && !names.includes('mark_paid'),
    `steps: its own, then $ending, then cancel_order: ${JSON.stringify(names)}`);
  const seqs = d.steps.map((s) => s.seq);
  check(seqs.every((q, i) => i === 0 || q > seqs[i - 1]), `steps in order: ${seqs}`);
  check(await page.locator('#do-cancel').isDisabled(), 'Cancel disabled once cancelled');
  const order = await apiJson(`/order/${orderId}`);
  check(order.status === 'CANCELLED', `order ${orderId} CANCELLED: ${JSON.stringify(order)}`);
  await eventually(`stock back to ${state.stockBefore}`, async () => (await inventory()) === state.stockBefore);
  await shot('admin-3-cancelled.png', { fullPage: true });

  // Its compensation ran, so it cannot resume. The page offers Resume for
  // any cancelled workflow: if it does, the refusal must say why.
  if (await page.locator('#do-resume').isEnabled()) {
    await page.locator('#do-resume').click();
    await eventually('the resume refusal explained', async () =>
      (await text('#action-msg')).startsWith('resume refused: ') && (await text('#action-msg')).includes('restart it instead')
        && (await page.locator('#action-msg').getAttribute('class')).split(' ').includes('error'));
    await expectRefusal(409);
    check((await inventory()) === state.stockBefore, 'the refused resume changed no stock');
  }
});

scenario('Restart as new: "Restarted as <id>" and the new checkout\'s detail; cancelled again, stock back', async () => {
  const id = needs('checkoutId', 2);
  const before = needs('stockBefore', 2);
  check((await detail()).title === `Workflow ${id}` && (await detail()).facts.Status === 'cancelled',
    'needs scenario 3 (the cancelled checkout open)');
  await page.locator('#do-restart').click();
  const newId = await eventually('"Restarted as <new id>" shown', async () => {
    const m = (await text('#action-msg')).match(/^Restarted as ([0-9a-f]{32})\.$/);
    return m && m[1];
  });
  state.restartedId = newId;
  check(newId !== id, 'a new id');
  await eventually('the new workflow\'s detail shown', async () => {
    const d = await detail();
    return d.visible && d.title === `Workflow ${newId}` && d.facts.Kind === 'checkout';
  });
  check(JSON.stringify(JSON.parse((await detail()).input)) === JSON.stringify(JSON.parse((await apiInput(id)))),
    'the same input as the original');
  await eventually('the new workflow listed in "All workflows"', async () => (await listed(newId)) !== null);
  const d = await untilShown(newId, 'the restarted checkout waiting for its payment, a unit reserved',
    (d, l) => l && l.status === 'waiting' && d.facts.Status === 'waiting'
      && d.steps.map((s) => s.name).slice(0, 2).join() === 'reserve_inventory,create_order', 90000);
  check(!d.steps.some((s) => s.name === '$ending' || s.name === 'cancel_order'), 'none of the original\'s compensation copied');
  const newOrder = Number(d.steps[1].output);
  check(newOrder > 0 && newOrder !== state.orderId, `a new order: ${newOrder}`);
  check((await apiJson(`/order/${newOrder}`)).status === 'PENDING', 'the new order is PENDING');
  check((await inventory()) === before - 1, 'one unit reserved again');
  const original = await apiJson(`/order/${state.orderId}`);
  check(original.status === 'CANCELLED', 'the original order stays CANCELLED');
  await shot('admin-4-restarted.png', { fullPage: true });

  // Leave nothing waiting: cancel the new one too.
  await page.locator('#do-cancel').click();
  await eventually('the cancel reported', async () => (await text('#action-msg')).startsWith('Cancel delivered'));
  await untilShown(newId, 'the restarted checkout cancelled',
    (d, l) => l && l.status === 'cancelled' && d.steps.some((s) => s.name === 'cancel_order'), 90000);
  check((await apiJson(`/order/${newOrder}`)).status === 'CANCELLED', 'the new order CANCELLED');
  await eventually(`stock back to ${before}`, async () => (await inventory()) === before);
});

scenario('the token stays in this tab: a reload stays signed in; another tab asks; Sign out returns to the form and forgets it', async () => {
  check((await storedToken()) === TOKEN, 'the token is in sessionStorage');
  await page.reload({ waitUntil: 'load' });
  await page.locator('#lists').waitFor({ state: 'visible', timeout: 30000 });
  check(JSON.stringify(await signedInState()) === JSON.stringify({ signIn: false, lists: true, signOut: true }),
    `signed in after a reload: ${JSON.stringify(await signedInState())}`);
  await fleetShown();
  if (state.checkoutId) {
    await eventually('the list loaded after the reload', async () => (await listed(state.checkoutId)) !== null);
  }

  // sessionStorage is the tab's own: another tab must sign in.
  const other = await context.newPage();
  browser.watch(other);
  try {
    await other.goto(`${BASE}/admin/`, { waitUntil: 'load' });
    await other.locator('#sign-in').waitFor({ state: 'visible', timeout: 30000 });
    check(await other.locator('#lists').isHidden(), 'another tab is not signed in');
  } finally {
    await other.close();
  }

  await page.locator('#sign-out').click();
  await page.locator('#sign-in').waitFor({ state: 'visible', timeout: 30000 });
  check(JSON.stringify(await signedInState()) === JSON.stringify({ signIn: true, lists: false, signOut: false }),
    `signed out: ${JSON.stringify(await signedInState())}`);
  check(await page.locator('#detail').isHidden(), 'the detail panel hidden');
  check((await text('#sign-in-msg')) === '', 'no error after signing out');
  check((await storedToken()) === null, 'the token is forgotten');
  await page.reload({ waitUntil: 'load' });
  await page.locator('#sign-in').waitFor({ state: 'visible', timeout: 30000 });
  check(await page.locator('#lists').isHidden(), 'still signed out after a reload');
  await shot('admin-5-signed-out.png');
});

await runScenarios(browser, scenarios, { suite: 'admin', prefix: 'admin ', shot });
