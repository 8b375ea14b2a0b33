// Drives the storefront page in headless Chromium as a shopper would,
// against the real stack that tests/browser/run.sh started. Every wait is
// on a condition with a deadline. One PASS/FAIL line per scenario, then
// `browser (storefront): N passed, M failed`; exit 1 on any failure.
//
// Environment: BASE_URL, API_PID (the API process, stopped and continued
// in scenario 5), ARTIFACTS (screenshot folder), CHROMIUM.

import path from 'node:path';
import { check, eventually, launch, runScenarios } from './harness.mjs';

const BASE = process.env.BASE_URL;
const API_PID = Number(process.env.API_PID);
const ARTIFACTS = process.env.ARTIFACTS;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
const WORKERS = 3;
if (!BASE || !API_PID || !ARTIFACTS) {
  console.error('BASE_URL, API_PID and ARTIFACTS must be set (run tests/browser/run.sh)');
  process.exit(2);
}

const browser = await launch(CHROMIUM, DESKTOP);
const { page } = browser;

// Every idempotency key the page sent, in order.
const checkoutKeys = [];
page.on('request', (r) => {
  const m = r.url().match(/\/checkout\/([^/?]+)$/);
  if (m && r.method() === 'POST') checkoutKeys.push(decodeURIComponent(m[1]));
});


const stock = async () => Number(await page.locator('#stock').getAttribute('data-inventory'));
const orderStatus = () => page.locator('#order-status').getAttribute('data-status');
const liveWorkerIds = () => page.locator('#workers > li').evaluateAll((lis) => lis.map((li) => li.dataset.workerId));
async function apiJson(p) {
  const r = await page.request.get(BASE + p);
  check(r.ok(), `GET ${p}: ${r.status()}`);
  return r.json();
}

/** GET `p` with the page's own fetch, from its origin, parsed as JSON. */
async function pageJson(p) {
  const r = await page.evaluate(async (p) => {
    const r = await fetch(p, { cache: 'no-store' });
    return { status: r.status, body: await r.text() };
  }, p);
  check(r.status === 200, `GET ${p} from the page: ${r.status} ${r.body}`);
  return JSON.parse(r.body);
}

/** Waits for the order's dispatch workflow to succeed (its tenth step has
 * run: with a step applied twice the order shows DISPATCHED a step early),
 * then checks through the timeline API that its `update_progress` steps
 * left 9, 8, ..., 0: each applied exactly once. Returns the timeline. */
async function checkEachProgressStepOnce(orderId) {
  const timeline = await eventually(`order ${orderId}'s dispatch workflow succeeded`, async () => {
    const t = await pageJson(`/order/${orderId}/timeline`);
    return t.workflows.some((w) => w.workflow === 'dispatch' && w.status === 'succeeded') ? t : null;
  }, 60000);
  const outputs = timeline.steps
    .filter((s) => s.workflow === 'dispatch' && s.name === 'update_progress')
    .map((s) => s.output);
  const expected = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0];
  check(JSON.stringify(outputs) === JSON.stringify(expected),
    `each progress step applied exactly once: the update_progress steps left ${JSON.stringify(outputs)}, not ${JSON.stringify(expected)}`);
  return timeline;
}

/** The page's timeline rows: { workflow, name, seq, worker }. */
const timelineRows = () => page.locator('#timeline tbody tr[data-workflow]').evaluateAll((trs) =>
  trs.map((tr) => ({ workflow: tr.dataset.workflow, name: tr.dataset.name, seq: Number(tr.cells[0].textContent), worker: tr.dataset.workerId })));

async function openStore() {
  await page.goto(BASE, { waitUntil: 'load' });
  await eventually('the product and the fleet to show', async () =>
    !Number.isNaN(await stock()) && (await page.locator('#workers > li').count()) === WORKERS, 30000);
}

async function buyAndReachPayment() {
  await page.locator('#buy').click();
  await page.locator('#view-payment').waitFor({ state: 'visible', timeout: 70000 });
  return page.locator('#payment-id').textContent();
}

async function confirmAndOpenOrder(button = '#pay-confirm') {
  await page.locator(button).click();
  await page.locator('#view-order').waitFor({ state: 'visible', timeout: 70000 });
  return Number(await page.locator('#order-id').textContent());
}

async function shot(name, options = {}) {
  await page.screenshot({ path: path.join(ARTIFACTS, name), ...options });
}

const scenarios = [];
function scenario(title, body) { scenarios.push({ title, body }); }

scenario('buy with the keyboard, confirm payment: order reaches DISPATCHED, progress bar full', async () => {
  await openStore();
  // Keyboard only: Tab to Buy Now, Enter; then Tab to Confirm payment, Enter.
  await page.locator('body').focus();
  await eventually('Tab reaches Buy Now', async () => {
    await page.keyboard.press('Tab');
    return page.evaluate(() => document.activeElement && document.activeElement.id === 'buy');
  }, 10000);
  await page.keyboard.press('Enter');
  await page.locator('#view-payment').waitFor({ state: 'visible', timeout: 70000 });
  await eventually('Tab reaches Confirm payment', async () => {
    await page.keyboard.press('Tab');
    return page.evaluate(() => document.activeElement && document.activeElement.id === 'pay-confirm');
  }, 10000);
  await page.keyboard.press('Enter');
  await page.locator('#view-order').waitFor({ state: 'visible', timeout: 70000 });
  const orderId = Number(await page.locator('#order-id').textContent());
  check(orderId > 0, `order id shown: ${orderId}`);
  await eventually('order DISPATCHED', async () => (await orderStatus()) === 'DISPATCHED', 60000);
  const bar = page.locator('#order-progress');
  check(await bar.getAttribute('aria-valuenow') === '10' && await bar.getAttribute('aria-valuemax') === '10',
    'order view progress bar full');
  const row = page.locator(`#orders > li[data-order-id="${orderId}"]`);
  await eventually('recent orders show it DISPATCHED with a full bar', async () =>
    (await row.getAttribute('data-status')) === 'DISPATCHED' && (await row.locator('.bar').getAttribute('aria-valuenow')) === '10');
  await checkEachProgressStepOnce(orderId);
  await shot('1-dispatched.png', { fullPage: true });
});

scenario('crash workers from the page while the order dispatches: DISPATCHED anyway, each step once, several workers', async () => {
  await openStore();
  const paymentId = await buyAndReachPayment();
  const orderId = await confirmAndOpenOrder();
  const crashed = [];
  // Crash the worker that ran the dispatch's latest step, as soon as the
  // timeline shows it, three times: each crash forces a takeover.
  while (crashed.length < 3) {
    if ((await orderStatus()) === 'DISPATCHED') break;
    const owner = await eventually('a dispatch step on a worker not crashed yet', async () => {
      if ((await orderStatus()) === 'DISPATCHED') return 'done';
      const steps = (await timelineRows()).filter((s) => s.workflow === 'dispatch');
      const last = steps[steps.length - 1];
      if (!last || crashed.includes(last.worker)) return null;
      return (await liveWorkerIds()).includes(last.worker) ? last.worker : null;
    }, 30000);
    if (owner === 'done') break;
    const crash = page.locator(`#workers > li[data-worker-id="${owner}"] button.crash`);
    await crash.click();
    crashed.push(owner);
    await eventually(`crashed worker ${owner} leaves the fleet panel`, async () =>
      !(await liveWorkerIds()).includes(owner), 15000);
  }
  check(crashed.length >= 2, `crashed only ${crashed.length} worker(s) before the order was dispatched`);
  await eventually('order DISPATCHED after the crashes', async () => (await orderStatus()) === 'DISPATCHED', 90000);
  check(await page.locator('#order-progress').getAttribute('aria-valuenow') === '10', 'progress bar full');
  const order = await apiJson(`/order/${orderId}`);
  check(order.progress_remaining === 0 && order.status === 'DISPATCHED', `order's progress reached 0: ${JSON.stringify(order)}`);
  const timeline = await checkEachProgressStepOnce(orderId);
  check(!JSON.stringify(timeline).includes(paymentId), 'the payment id is not on the timeline');
  const rows = await eventually(`the page's timeline shows the ${timeline.steps.length} steps the API lists`, async () => {
    const r = await timelineRows();
    return r.length === timeline.steps.length ? r : null;
  });
  const dispatch = rows.filter((s) => s.workflow === 'dispatch');
  const seqs = dispatch.map((s) => s.seq);
  check(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `dispatch steps in order, none twice: ${seqs}`);
  const dispatchWorkers = new Set(dispatch.map((s) => s.worker));
  check(dispatchWorkers.size >= 2, `dispatch steps ran on ${dispatchWorkers.size} worker(s)`);
  check(crashed.every((id) => dispatchWorkers.has(id)), 'every crashed worker had run a dispatch step');
  check(rows.some((s) => s.workflow === 'checkout') && rows[0].workflow === 'checkout', 'checkout steps listed first');
  check(Number(await page.locator('#timeline-summary').getAttribute('data-workers')) >= 2, 'timeline summary counts several workers');
  check(await page.locator('#timeline tr.handover').count() >= 1, 'a takeover is marked in the timeline');
  await eventually(`the launcher restarted the crashed workers: ${WORKERS} live, none of them crashed`, async () => {
    const ids = await liveWorkerIds();
    return ids.length === WORKERS && !ids.some((id) => crashed.includes(id));
  }, 30000);
  console.log(`      crashed ${crashed.length} workers; dispatch ran on ${dispatchWorkers.size} workers`);
  await shot('2-crashes-dispatched.png', { fullPage: true });
  // The README's picture: the store beside its fleet and this timeline.
  await page.locator('#continue').click();
  await page.locator('#view-store').waitFor({ state: 'visible' });
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  await shot('storefront-desktop.png', { fullPage: true });
  await page.setViewportSize(PHONE);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `no horizontal scrolling on a phone (${overflow} px too wide)`);
  await shot('storefront-phone.png', { fullPage: true });
  await page.setViewportSize(DESKTOP);
});

scenario('buy, cancel payment: CANCELLED, stock back', async () => {
  await openStore();
  const before = await stock();
  await buyAndReachPayment();
  await eventually('stock shown one lower while the payment is open', async () => (await stock()) === before - 1);
  await confirmAndOpenOrder('#pay-cancel');
  await eventually('order CANCELLED', async () => (await orderStatus()) === 'CANCELLED');
  await page.locator('#continue').click();
  await page.locator('#view-store').waitFor({ state: 'visible' });
  await eventually(`stock back to ${before}`, async () => (await stock()) === before);
  check((await page.locator('#stock').textContent()) === `Only ${before} left!`, 'stock text');
  await shot('3-cancelled-stock-back.png', { fullPage: true });
});

scenario('stock at zero: Buy disabled; Restock enables it', async () => {
  await openStore();
  const r = await page.request.post(`${BASE}/restock`, { data: { inventory: 0 } });
  check(r.ok(), `POST /restock {"inventory":0}: ${r.status()}`);
  await eventually('Buy Now disabled at zero stock', async () =>
    (await stock()) === 0 && await page.locator('#buy').isDisabled());
  check((await page.locator('#stock').textContent()) === 'Sold out', 'sold out shown');
  await shot('4-sold-out.png');
  await page.locator('#restock').click();
  await eventually('Buy Now enabled after Restock', async () =>
    (await stock()) === 100 && await page.locator('#buy').isEnabled());
  await shot('4-restocked.png');
});

scenario('API stopped: "Connection lost" banner; API back: banner gone', async () => {
  await openStore();
  const banner = page.locator('#banner');
  check(await banner.isHidden(), 'no banner while the API answers');
  process.kill(API_PID, 'SIGSTOP');
  try {
    await banner.waitFor({ state: 'visible', timeout: 10000 });
    check((await banner.textContent()).includes('Connection lost'), 'banner text');
    await shot('5-connection-lost.png');
  } finally {
    process.kill(API_PID, 'SIGCONT');
  }
  await banner.waitFor({ state: 'hidden', timeout: 10000 });
  await shot('5-reconnected.png');
});

scenario('fresh key per purchase; a retry after a lost answer reuses it: one order', async () => {
  await openStore();
  const before = await stock();
  const ordersBefore = (await apiJson('/orders?limit=500')).length;
  const sentBefore = checkoutKeys.length;
  // The store takes the first request but its answer is lost on the way.
  let lost = false;
  await page.route('**/checkout/*', async (route) => {
    if (lost) return route.continue();
    lost = true;
    await route.fetch();
    await route.abort('connectionreset');
  });
  await page.locator('#buy').click();
  await eventually('the page offers to retry the same purchase', async () =>
    (await page.locator('#buy').textContent()) === 'Retry purchase' && await page.locator('#buy').isEnabled());
  await page.locator('#buy').click();
  await page.locator('#view-payment').waitFor({ state: 'visible', timeout: 70000 });
  await page.unroute('**/checkout/*');
  const sent = checkoutKeys.slice(sentBefore);
  check(sent.length === 2 && sent[0] === sent[1], `the retry sent the same key: ${sent}`);
  check((await page.locator('#payment-id').textContent()) === sent[0], 'payment id is that key');
  const ordersAfter = (await apiJson('/orders?limit=500')).length;
  check(ordersAfter === ordersBefore + 1, `one order for the two requests (${ordersBefore} -> ${ordersAfter})`);
  await eventually('stock one lower, not two', async () => (await stock()) === before - 1);
  const distinct = new Set(checkoutKeys);
  const purchases = checkoutKeys.length - 1; // one purchase was sent twice
  check(distinct.size === purchases, `every other purchase had a fresh key: ${checkoutKeys.length} requests, ${distinct.size} keys`);
  await confirmAndOpenOrder('#pay-cancel');
  await eventually('order CANCELLED', async () => (await orderStatus()) === 'CANCELLED');
  await shot('6-retry-same-key.png', { fullPage: true });
  // The lost answer was a connection reset the browser reports as such.
  browser.forget((p) => p.includes('ERR_CONNECTION_RESET'));
});

await runScenarios(browser, scenarios, { suite: 'storefront', prefix: '', shot });
