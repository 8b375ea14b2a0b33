// What the browser tests share: headless Chromium, the console and page
// errors a scenario caused, waiting on a condition with a deadline, and
// running scenarios with one PASS/FAIL line each.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

export class Failure extends Error {}
export function check(ok, message) { if (!ok) throw new Failure(message); }

/** Polls `probe` every `intervalMs` until it returns a truthy value; fails
 * with `what` and the last value seen after `timeoutMs`. */
export async function eventually(what, probe, timeoutMs = 15000, intervalMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) { last = e.message; }
    if (Date.now() > deadline) throw new Failure(`timed out after ${timeoutMs / 1000} s waiting for: ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Headless Chromium with a profile of its own; `problems` collects the
 * console and page errors of every page passed to `watch`. */
export async function launch(executablePath, viewport) {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'widget-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  const browser = {
    context,
    page: context.pages()[0] ?? await context.newPage(),
    problems: [],
    watch(p) {
      p.on('console', (m) => { if (m.type() === 'error') browser.problems.push(`console: ${m.text()}`); });
      p.on('pageerror', (e) => browser.problems.push(`page error: ${e.message}`));
    },
    /** Drops the problems a scenario provoked on purpose. */
    forget(provoked) {
      const kept = browser.problems.filter((p) => !provoked(p));
      browser.problems.splice(0, browser.problems.length, ...kept);
    },
    async close() {
      await context.close();
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
  browser.watch(browser.page);
  return browser;
}

/** Runs `scenarios` ({title, body}) in order: each passes when its body
 * returns and it caused no console or page error. Prints
 * `[browser] PASS|FAIL <prefix>N title`, screenshots a failure, closes the
 * browser and exits with the outcome. */
export async function runScenarios(browser, scenarios, { suite, prefix, shot }) {
  let passed = 0;
  let failed = 0;
  for (const [i, s] of scenarios.entries()) {
    const n = i + 1;
    const started = Date.now();
    browser.problems.length = 0;
    const took = () => ((Date.now() - started) / 1000).toFixed(1);
    try {
      await s.body();
      check(browser.problems.length === 0, `console/page errors: ${browser.problems.join(' | ')}`);
      passed++;
      console.log(`[browser] PASS ${prefix}${n} ${s.title} (${took()} s)`);
    } catch (e) {
      failed++;
      console.log(`[browser] FAIL ${prefix}${n} ${s.title} (${took()} s): ${e instanceof Failure ? e.message : e.stack}`);
      await shot(`${prefix.trim() ? prefix.trim() + '-' : ''}${n}-FAILED.png`, { fullPage: true }).catch(() => {});
    }
  }
  await browser.close();
  console.log(`browser (${suite}): ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}
