// Drives the gateway's page in headless Chromium (Debian's `chromium`, through playwright-core):
// signs in with a token, opens a session, waits for the prompt, types a command with a unique
// marker and sees its output in the terminal buffer (through `window.__tether.transcript()`,
// no OCR). Optionally:
//
//   TETHER_TOKEN / TETHER_OBSERVER_TOKEN of the form idp:USER:PASSWORD sign in through the
//                           identity provider's own login form (Keycloak) instead of a token;
//                           TETHER_EXPECT_USER_PREFIX checks the signed-in name in the header;
//                           TETHER_OBSERVER_CANNOT_ATTACH=1 checks the observer is refused attach.
//   TETHER_OBSERVER_TOKEN=T the observer signs in with this token instead, in a browser profile
//                           of its own (another person: its cookie is not the first page's).
//   TETHER_OBSERVE=1        a second page observes the same session: read-only badge, sees the
//                           marker too, and its keystrokes never reach the shell.
//   TETHER_RESUME_LINES=N   prints line-1 … line-N slowly; once the stream is under way it asks
//                           for the gateway to be restarted (runs TETHER_RESTART_CMD, or prints
//                           `TETHER-BROWSER restart-gateway` on stdout and waits for a line on
//                           stdin when TETHER_RESTART_VIA_STDIO=1), then checks that every line
//                           arrived exactly once, in order, after the page resumed.
//   TETHER_SIGNIN_AGAIN_LINES=N  prints sig-1 … sig-N slowly and signs the browser out from
//                           under the terminal (POST /api/logout, as another tab would): the
//                           gateway closes with 4440, the page keeps its screen and shows the
//                           "sign in again" banner; the test signs in again there (the
//                           development-token field, else the popup, which must complete by
//                           itself, e.g. `dev-server.mjs --fake-oidc`) and checks that the same
//                           client resumed with every line exactly once.
//   TETHER_DELETE_VIA_STDIO=1  at the end, prints `TETHER-BROWSER delete-session` and waits for
//                           a line on stdin (the caller deletes the TerminalSession), then checks
//                           that every page ends with a message saying the session was deleted.
//
// Environment: TETHER_URL (gateway base URL), TETHER_TOKEN (login token), TETHER_SESSION
// (namespace/name), CHROMIUM (default /usr/bin/chromium), TETHER_TIMEOUT_MS (per step, 30000),
// TETHER_SCREENSHOT_DIR (screenshots, transcripts and streams on failure, screenshots on
// success), TETHER_RENDERER=dom (skip WebGL).
// Exit status 0 when everything passed; the last line on stdout is `TETHER-BROWSER ok` then.

import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync, mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';

const env = process.env;
const BASE = (env.TETHER_URL ?? '').replace(/\/$/, '');
const TOKEN = env.TETHER_TOKEN ?? '';
const SESSION = env.TETHER_SESSION ?? '';
const STEP = Number(env.TETHER_TIMEOUT_MS ?? 30_000);
const RESUME_LINES = Number(env.TETHER_RESUME_LINES ?? 0);
const OBSERVE = env.TETHER_OBSERVE === '1';
const SIGNIN_AGAIN_LINES = Number(env.TETHER_SIGNIN_AGAIN_LINES ?? 0);
if (!BASE || !TOKEN || !SESSION.includes('/')) {
  console.error('set TETHER_URL, TETHER_TOKEN and TETHER_SESSION=namespace/name');
  process.exit(2);
}
const [NS, NAME] = SESSION.split('/');

const log = (...m) => console.log('TETHER-BROWSER', ...m);
const t0 = Date.now();
const since = () => `${((Date.now() - t0) / 1000).toFixed(1)}s`;

const stdinLines = createInterface({ input: process.stdin });
const nextStdinLine = () => new Promise((resolve) => stdinLines.once('line', resolve));

const profiles = [];
async function launch() {
  const profile = mkdtempSync(join(tmpdir(), 'tether-chromium-'));
  profiles.push(profile);
  return chromium.launchPersistentContext(profile, {
    executablePath: env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
    ],
    viewport: { width: 1100, height: 700 },
  });
}
const context = await launch();
const OBSERVER_TOKEN = env.TETHER_OBSERVER_TOKEN ?? '';
const observerContext = OBSERVER_TOKEN ? await launch() : context;

const pages = [];
let failed = false;

async function newPage(label, ctx = context) {
  const page = await ctx.newPage();
  page.setDefaultTimeout(STEP);
  // Ask the page to keep the raw output stream, for the byte-exact resume check.
  await page.addInitScript(() => {
    window.__tetherCapture = true;
  });
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') log(`[${label} console.${m.type()}]`, m.text());
  });
  page.on('pageerror', (e) => log(`[${label} pageerror]`, e.message));
  pages.push([label, page]);
  return page;
}

const hook = (page, expr) => page.evaluate(expr);
const transcript = (page) => hook(page, () => window.__tether.transcript());

async function waitFor(page, what, fn, arg, timeout = STEP) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 100 });
  } catch (e) {
    const state = await page.evaluate(() => ({ view: window.__tether?.view, state: window.__tether?.state, detail: window.__tether?.detail, stats: window.__tether?.stats?.(), history: window.__tether?.history })).catch(() => null);
    const text = await transcript(page).catch(() => '');
    // The page's state comes last: CI shows the tail of the output.
    throw new Error(`timed out waiting for ${what}\n--- transcript tail ---\n${text.split('\n').slice(-15).join('\n')}\n--- page state while waiting for ${what} ---\n${JSON.stringify(state)}`);
  }
}

async function signIn(page, token = TOKEN) {
  await page.goto(`${BASE}/`);
  await waitFor(page, 'the sign-in form or the session list', () => ['login', 'sessions'].includes(window.__tether?.view));
  if ((await hook(page, () => window.__tether.view)) === 'login') {
    const idp = /^idp:([^:]+):(.+)$/.exec(token);
    if (idp) {
      // `idp:USER:PASSWORD`: "Sign in", then the identity provider's own login form (Keycloak's
      // ids), then back to the gateway with the session cookie.
      await page.click('#signin');
      await page.waitForSelector('#username', { timeout: STEP });
      log(`${since()} at the provider's login form: ${new URL(page.url()).origin}`);
      await page.fill('#username', idp[1]);
      await page.fill('#password', idp[2]);
      await Promise.all([page.waitForURL((u) => u.href.startsWith(BASE) && !u.pathname.startsWith('/auth/'), { waitUntil: 'load', timeout: STEP }), page.click('#kc-login')]);
      const who = await page.locator('#user').textContent();
      log(`${since()} signed in through the provider: ${who}`);
      if (token === TOKEN && env.TETHER_EXPECT_USER_PREFIX && !who.includes(env.TETHER_EXPECT_USER_PREFIX)) throw new Error(`expected ${env.TETHER_EXPECT_USER_PREFIX} in the header, got ${who}`);
    } else if (await page.locator('#token').count()) {
      await page.fill('#token', token);
      await page.click('#login-submit');
    } else {
      // Browser sign-in only: an identity provider that asks nothing (dev-server.mjs --fake-oidc).
      await Promise.all([page.waitForURL((u) => !u.pathname.startsWith('/auth/'), { waitUntil: 'load' }), page.click('#signin')]);
    }
    await waitFor(page, 'the session list after sign-in', () => window.__tether?.view === 'sessions');
  }
  const row = page.locator(`tr[data-session="${NS}/${NAME}"]`);
  await row.waitFor();
  const phase = await row.locator('.phase').textContent();
  log(`${since()} signed in; ${SESSION} is ${phase}`);
  return row;
}

async function openTerminal(page, row, mode) {
  const link = row.locator(`a[data-action="${mode === 'observe' ? 'observe' : 'open'}"]`);
  if (env.TETHER_RENDERER) {
    // e.g. TETHER_RENDERER=dom: the same route with WebGL skipped, to check the fallback renderer.
    const href = await link.getAttribute('href');
    await page.evaluate((h) => (location.hash = h), `${href}&renderer=${env.TETHER_RENDERER}`);
  } else {
    await link.click();
  }
  const want = mode === 'observe' ? 'read-only' : 'live';
  await waitFor(page, `state ${want}`, (w) => window.__tether.view === 'terminal' && window.__tether.state === w, want);
  const renderer = await hook(page, () => window.__tether.renderer);
  log(`${since()} ${mode}: ${want} (renderer ${renderer})`);
}

async function typeLine(page, text) {
  await page.click('#terminal');
  await page.keyboard.type(text, { delay: 5 });
  await page.keyboard.press('Enter');
}

/** The numbers N of `<prefix>N` in the received stream after `start`, escape sequences cut. */
async function streamNumbers(page, start, prefix) {
  const stream = (await hook(page, () => window.__tether.stream()))
    .slice(start)
    // Each sequence becomes a line break: after `clear`, `line-1` follows the command's echo
    // with only cursor movements in between.
    .replace(/\x1b\][^\x07\x1b]*(\x07|\x1b\\)/g, '\n')
    .replace(/\x1b\[[0-?]*[ -/]*[@-~]/g, '\n')
    .replace(/\x1b[()][0-9A-Za-z]|\x1b[=>78cDEHMNOZ]/g, '\n');
  return [...stream.matchAll(new RegExp(`(?<![\\w$-])${prefix}(\\d+)(?!\\d)`, 'g'))].map((m) => Number(m[1]));
}

/** The numbers N of the lines `<prefix>N` in the terminal's buffer. */
async function screenNumbers(page, prefix) {
  return (await transcript(page))
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => new RegExp(`^${prefix}\\d+$`).test(l))
    .map((l) => Number(l.slice(prefix.length)));
}

/** Problems with `got` as the run first..=last, each number exactly once and in order. */
function sequenceProblems(what, got, last, first = 1) {
  const problems = [];
  const count = new Map();
  for (const n of got) count.set(n, (count.get(n) ?? 0) + 1);
  for (let i = first; i <= last; i++) {
    if (!count.has(i)) problems.push(`${what}: line-${i} missing`);
    else if (count.get(i) > 1) problems.push(`${what}: line-${i} appears ${count.get(i)} times`);
  }
  for (let i = 1; i < got.length; i++) if (got[i] !== got[i - 1] + 1) problems.push(`${what}: line-${got[i]} follows line-${got[i - 1]}`);
  return problems.slice(0, 10);
}

try {
  // --- sign in, open, echo a unique marker ---------------------------------------------------
  const page = await newPage('attach');
  const row = await signIn(page);
  await openTerminal(page, row, 'attach');
  await waitFor(page, 'a shell prompt', () => /[$#>] *$/m.test(window.__tether.transcript()));
  log(`${since()} prompt seen`);

  let observer = null;
  if (OBSERVE) {
    observer = await newPage('observe', observerContext);
    const orow = await signIn(observer, OBSERVER_TOKEN || TOKEN);
    if (env.TETHER_OBSERVER_CANNOT_ATTACH === '1') {
      // Observe-only: the list offers no way to type, and the gateway refuses attach anyway.
      if ((await orow.locator('a[data-action="open"]').getAttribute('aria-disabled')) !== 'true') throw new Error('the observer is offered to attach');
      const status = await observer.evaluate(async (s) => (await fetch(`/api/sessions/${s}?mode=attach`)).status, SESSION);
      if (status !== 403) throw new Error(`the observer's attach check answered ${status}, not 403`);
      log(`${since()} the observer cannot attach (403)`);
    }
    await openTerminal(observer, orow, 'observe');
  }

  const marker = `tether-${randomBytes(4).toString('hex')}`;
  // The shell prints `marker-42`; the echoed command line shows `$((6*7))`, so seeing the
  // printed form proves the shell ran it.
  await typeLine(page, `echo ${marker}-$((6*7))`);
  await waitFor(page, `the output ${marker}-42`, (m) => window.__tether.transcript().split('\n').some((l) => l.trim() === m), `${marker}-42`);
  log(`${since()} attach page shows ${marker}-42`);

  if (observer) {
    await waitFor(observer, `the observer to see ${marker}-42`, (m) => window.__tether.transcript().includes(m), `${marker}-42`);
    // Keystrokes in the observer go nowhere: the page sends no INPUT and the server would refuse it.
    await observer.click('#terminal');
    await observer.keyboard.type('echo observer-typed-this', { delay: 5 });
    await observer.keyboard.press('Enter');
    await typeLine(page, `echo after-observer-${marker}`);
    await waitFor(page, 'the after-observer line', (m) => window.__tether.transcript().split('\n').some((l) => l.trim() === m), `after-observer-${marker}`);
    const leaked = (await transcript(page)).includes('observer-typed-this');
    const state = await hook(observer, () => window.__tether.state);
    if (leaked) throw new Error('observer keystrokes reached the shell');
    if (state !== 'read-only') throw new Error(`observer state is ${state}, not read-only`);
    log(`${since()} observer saw the output, its keystrokes did not reach the shell`);
  }

  // --- scrollback: the program's own lines, scrolled with the wheel and searched --------------
  {
    const seqDone = `seq-done-${marker}`;
    await typeLine(page, `seq -f 'row-%03g' 1 300; echo ${seqDone}`);
    await waitFor(page, seqDone, (m) => window.__tether.transcript().split('\n').some((l) => l.trim() === m), seqDone);
    const box = await page.locator('#terminal').boundingBox();
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
    // The wheel with Alt held (xterm.js's fast scroll, 5x): each turn waits for the page to
    // render, which a software GPU makes slow, so fewer turns keep the test short.
    let top = null;
    const wheelStart = Date.now();
    let turns = 0;
    await page.keyboard.down('Alt');
    for (; turns < 150 && top === null; turns++) {
      await page.mouse.wheel(0, -400);
      const rows = await hook(page, () => window.__tether.viewport());
      const at = rows.findIndex((r) => r.trim() === 'row-001');
      if (at >= 0) top = at;
    }
    await page.keyboard.up('Alt');
    log(`${since()} ${turns} wheel turns in ${Date.now() - wheelStart} ms`);
    if (top === null) throw new Error(`the mouse wheel did not scroll back to row-001; the viewport shows ${JSON.stringify(await hook(page, () => window.__tether.viewport()))}`);
    log(`${since()} the wheel scrolled back to row-001 (viewport row ${top})`);
    // Back to the bottom, then find a line that scrolled off the screen with the search box.
    await hook(page, () => window.__tether.scrollToBottom());
    await page.click('#terminal');
    await page.keyboard.press('Control+Shift+F');
    await page.locator('#search-input').waitFor({ state: 'visible', timeout: STEP });
    await page.fill('#search-input', 'row-007');
    await page.locator('#search-input').press('Enter');
    await waitFor(page, 'the search to select row-007', () => window.__tether.selection() === 'row-007');
    const shown = await hook(page, () => window.__tether.viewport());
    if (!shown.some((r) => r.includes('row-007'))) throw new Error(`search selected row-007 but the viewport shows ${JSON.stringify(shown)}`);
    await page.locator('#search-input').press('Escape');
    log(`${since()} the search addon found row-007, which had scrolled off the screen`);
  }

  // --- resume across a gateway restart --------------------------------------------------------
  if (RESUME_LINES > 0) {
    const N = RESUME_LINES;
    const done = `resume-done-${marker}`;
    const before = await hook(page, () => window.__tether.stats());
    // Only output after this point counts (tmux redraws older screens when a client opens).
    const streamStart = (await hook(page, () => window.__tether.stream())).length;
    await typeLine(page, `clear; for i in $(seq 1 ${N}); do echo line-$i; sleep ${env.TETHER_RESUME_DELAY ?? '0.01'}; done; echo ${done}`);
    const early = Math.max(1, Math.min(20, Math.floor(N / 10)));
    await waitFor(page, `line-${early}`, (m) => window.__tether.transcript().split('\n').some((l) => l.trim() === m), `line-${early}`);
    log(`${since()} stream under way (line-${early} seen), restarting the gateway`);
    if (env.TETHER_RESTART_CMD) {
      execSync(env.TETHER_RESTART_CMD, { stdio: 'inherit', shell: '/bin/bash' });
    } else {
      log('restart-gateway');
      if (env.TETHER_RESTART_VIA_STDIO === '1') {
        await nextStdinLine();
      }
    }
    // The observer's page was opened last; keep the attach page in front so that no background
    // timer throttling can slow its reconnect.
    await page.bringToFront();
    await waitFor(page, 'a reconnect', (n) => window.__tether.stats().connects > n, before.connects);
    log(`${since()} page reconnecting: ${await hook(page, () => window.__tether.detail)}`);
    await waitFor(page, `${done}`, (m) => window.__tether.transcript().split('\n').some((l) => l.trim() === m), done);
    // The lines may all have arrived before the gateway went away (a slow restart): the resume
    // then completes after `done` is on screen. Wait for it; a page that never resumes fails here.
    await waitFor(page, 'the resume to complete', (b) => window.__tether.stats().resumes > b.resumes || window.__tether.stats().reopens > b.reopens, { resumes: before.resumes, reopens: before.reopens });
    // A rollout replaces the replicas one by one: the page may have resumed on an old replica
    // that goes away next. Wait until it is live again, after every cut of the restart.
    await waitFor(page, 'the page live again after the restart', () => window.__tether.state === 'live');
    const after = await hook(page, () => window.__tether.stats());
    const problems = [];
    // 1. The byte stream the page received, escape sequences removed: line-1 … line-N, each
    //    exactly once and in order (a lost or repeated chunk across the reconnect shows here).
    problems.push(...sequenceProblems('stream', await streamNumbers(page, streamStart, 'line-'), N));
    // 2. The terminal's buffer: the lines still on screen are a gap-free, duplicate-free run that
    //    ends with line-N (all of them when N fits on the screen).
    const onScreen = await screenNumbers(page, 'line-');
    const first = onScreen.length ? onScreen[0] : N + 1;
    problems.push(...sequenceProblems('screen', onScreen, N, first));
    const rows = after.rows;
    if (N + 4 < rows && first !== 1) problems.push(`screen: only line-${first}… is shown although all ${N} lines fit`);
    if (after.resumes <= before.resumes) problems.push(`the page did not resume (stats ${JSON.stringify(after)})`);
    if (after.snapshots > before.snapshots) problems.push('the page got a snapshot instead of a replay');
    if (after.reopens > before.reopens) problems.push('the page opened a new client instead of resuming');
    if (problems.length) throw new Error(`resume lost or repeated output:\n  ${problems.slice(0, 20).join('\n  ')}`);
    log(`${since()} stream and screen: all ${N} lines arrived exactly once (${onScreen.length} on screen) across ${after.connects - before.connects} reconnect(s) (${after.resumes - before.resumes} resume(s))`);
    const state = await hook(page, () => window.__tether.state);
    if (state !== 'live' && state !== 'reconnecting') throw new Error(`state after resume is ${state}`);
  }
  // --- the sign-in ends under the terminal (4440): sign in again, the same client resumes -------
  if (SIGNIN_AGAIN_LINES > 0) {
    const N = SIGNIN_AGAIN_LINES;
    const done = `signin-again-done-${marker}`;
    const before = await hook(page, () => window.__tether.stats());
    const streamStart = (await hook(page, () => window.__tether.stream())).length;
    await typeLine(page, `clear; for i in $(seq 1 ${N}); do echo sig-$i; sleep ${env.TETHER_RESUME_DELAY ?? '0.01'}; done; echo ${done}`);
    const early = Math.max(1, Math.min(20, Math.floor(N / 10)));
    await waitFor(page, `sig-${early}`, (m) => window.__tether.transcript().split('\n').some((l) => l.trim() === m), `sig-${early}`);
    const status = await page.evaluate(() => fetch('/api/logout', { method: 'POST', credentials: 'same-origin' }).then((r) => r.status));
    if (status !== 200) throw new Error(`POST /api/logout answered ${status}`);
    log(`${since()} signed out under the terminal (sig-${early} seen)`);
    // The gateway may notice at its next re-check of the credential: allow two steps.
    await waitFor(page, 'the sign-in-again banner', () => window.__tether.state === 'signed-out' && window.__tether.signInAgain, undefined, 2 * STEP);
    const words = await page.locator('#signin-again-text').textContent();
    if (!(await page.locator('#signin-again-banner').isVisible())) throw new Error('the sign-in-again banner is not visible');
    if ((await page.locator('#signin-again-banner').getAttribute('role')) !== 'alert') throw new Error('the banner is not role=alert');
    // The screen still shows what had arrived when the 4440 came: the last whole line received
    // (lines kept coming until the gateway noticed, so sig-${early} may have scrolled away).
    const received = await streamNumbers(page, streamStart, 'sig-');
    const lastWhole = Math.max(early, ...received) - 1;
    if (lastWhole >= early && !(await transcript(page)).split('\n').some((l) => l.trim() === `sig-${lastWhole}`)) {
      throw new Error(`the terminal lost its buffer on 4440: sig-${lastWhole} had arrived but is not on screen`);
    }
    const kept = await hook(page, () => window.__tether.stats());
    if (kept.connects !== before.connects) throw new Error(`the page reconnected while signed out (${JSON.stringify(kept)})`);
    log(`${since()} banner: ${JSON.stringify(words)}; screen kept, no reconnect`);
    await page.locator('#signin-again:visible, #signin-again-form:visible').first().waitFor();
    if (await page.locator('#signin-again-form').isVisible()) {
      await page.fill('#signin-again-token', TOKEN);
      await page.click('#signin-again-token-submit');
      log(`${since()} signed in again with the development token`);
    } else {
      const [popup] = await Promise.all([context.waitForEvent('page'), page.click('#signin-again')]);
      log(`${since()} sign-in popup opened: ${popup.url()}`);
      // done.js closes it (it may be closed already).
      if (!popup.isClosed()) await popup.waitForEvent('close', { timeout: STEP }).catch(() => log(`the popup stayed open at ${popup.url()}`));
    }
    await waitFor(page, 'the banner to go and the terminal to be live', () => window.__tether.state === 'live' && !window.__tether.signInAgain);
    await waitFor(page, done, (m) => window.__tether.transcript().split('\n').some((l) => l.trim() === m), done);
    const after = await hook(page, () => window.__tether.stats());
    const problems = [...sequenceProblems('stream', await streamNumbers(page, streamStart, 'sig-'), N)];
    const onScreen = await screenNumbers(page, 'sig-');
    problems.push(...sequenceProblems('screen', onScreen, N, onScreen.length ? onScreen[0] : N + 1));
    if (after.resumes <= before.resumes) problems.push(`the page did not resume (stats ${JSON.stringify(after)})`);
    if (after.client !== before.client) problems.push(`another client: ${after.client}, was ${before.client}`);
    if (after.snapshots > before.snapshots) problems.push('the page got a snapshot instead of a replay');
    if (after.reopens > before.reopens) problems.push('the page opened a new client instead of resuming');
    if (problems.length) throw new Error(`sign-in again lost or repeated output:\n  ${problems.slice(0, 20).join('\n  ')}`);
    log(`${since()} signed in again: the same client resumed, all ${N} sig- lines exactly once`);
    // An observer signed in with the same cookie was signed out too; it resumes by itself.
    for (const [label, p] of pages) {
      if (p === page) continue;
      await waitFor(p, `${label}: back after the sign-in`, () => ['live', 'read-only'].includes(window.__tether.state) && !window.__tether.signInAgain);
    }
  }
  // --- the session is deleted under the pages ---------------------------------------------
  if (env.TETHER_DELETE_VIA_STDIO === '1') {
    log('delete-session');
    await nextStdinLine();
    for (const [label, p] of pages) {
      await waitFor(p, `${label}: the page to end saying the session was deleted`, () => window.__tether.state === 'ended' && /deleted/.test(window.__tether.detail ?? ''));
      const banner = await p.locator('#ended-text').textContent();
      if (!(await p.locator('#ended').isVisible()) || !/deleted/.test(banner ?? '')) throw new Error(`${label}: the ended banner shows ${JSON.stringify(banner)}`);
      log(`${since()} ${label}: ${banner}`);
    }
  }
  if (env.TETHER_SCREENSHOT_DIR) {
    mkdirSync(env.TETHER_SCREENSHOT_DIR, { recursive: true });
    for (const [label, p] of pages) await p.screenshot({ path: join(env.TETHER_SCREENSHOT_DIR, `${label}-ok.png`) }).catch(() => {});
  }
  log(`ok in ${since()}`);
} catch (e) {
  failed = true;
  console.error(`TETHER-BROWSER FAILED after ${since()}: ${e.stack ?? e}`);
  if (env.TETHER_SCREENSHOT_DIR) {
    mkdirSync(env.TETHER_SCREENSHOT_DIR, { recursive: true });
    for (const [label, p] of pages) {
      await p.screenshot({ path: join(env.TETHER_SCREENSHOT_DIR, `${label}.png`) }).catch(() => {});
      const text = await transcript(p).catch(() => '');
      writeFileSync(join(env.TETHER_SCREENSHOT_DIR, `${label}.txt`), text);
      const stream = await p.evaluate(() => window.__tether.stream()).catch(() => '');
      writeFileSync(join(env.TETHER_SCREENSHOT_DIR, `${label}.stream`), stream);
    }
  }
} finally {
  await context.close().catch(() => {});
  if (observerContext !== context) await observerContext.close().catch(() => {});
  for (const profile of profiles) rmSync(profile, { recursive: true, force: true });
  stdinLines.close();
}
process.exit(failed ? 1 : 0);
