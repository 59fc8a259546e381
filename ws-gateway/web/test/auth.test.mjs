// The sign-in flow's decisions (src/auth.ts): where /auth/login returns to, how the route survives
// the round trip, which sign-in methods are offered, the header's and the banner's words.
// Run: npm run test:unit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { build } from 'esbuild';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = mkdtempSync(join(tmpdir(), 'tether-auth-'));
await build({ absWorkingDir: root, entryPoints: ['src/auth.ts'], outfile: join(out, 'auth.mjs'), bundle: true, format: 'esm', platform: 'neutral', logLevel: 'warning' });
const a = await import(join(out, 'auth.mjs'));
rmSync(out, { recursive: true, force: true });

function memoryStore() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)), removeItem: (k) => m.delete(k), m };
}

test('login URLs: next is a path on the gateway, the fragment is not part of it', () => {
  assert.equal(a.loginUrl('/'), '/auth/login?next=%2F');
  assert.equal(a.loginUrl(a.DONE_PATH), '/auth/login?next=%2Fauth%2Fdone');
  assert.equal(a.nextOf({ pathname: '/', search: '?x=1' }), '/?x=1');
  assert.equal(a.safeNext('//evil.example/'), '/');
  assert.equal(a.safeNext('/\\evil.example/'), '/');
  assert.equal(a.safeNext('https://evil.example/'), '/');
  assert.equal(new URL(a.loginUrl('/a b?c=d&e'), 'http://g').searchParams.get('next'), '/a b?c=d&e');
});

test('the route survives a full-page sign-in once, only when the page came back without one', () => {
  const s = memoryStore();
  const hash = '#/s/team-a/dev?mode=attach';
  a.rememberHash(s, hash, 1000);
  assert.equal(a.takeHash(s, '', 2000), hash);
  assert.equal(a.takeHash(s, '', 2000), null, 'forgotten once restored');

  a.rememberHash(s, hash, 1000);
  assert.equal(a.takeHash(s, '#/s/other/x?mode=observe', 2000), null, 'a route of its own wins');
  assert.equal(s.m.size, 0);

  a.rememberHash(s, hash, 1000);
  assert.equal(a.takeHash(s, '', 1000 + a.HASH_TTL_MS), null, 'too old');

  a.rememberHash(s, '#/', 1000);
  assert.equal(s.m.size, 0, 'the default route is not worth keeping');
  s.setItem(a.HASH_KEY, 'not json');
  assert.equal(a.takeHash(s, '', 0), null);
  s.setItem(a.HASH_KEY, JSON.stringify({ hash: 'javascript:alert(1)', at: 0 }));
  assert.equal(a.takeHash(s, '', 1), null, 'only routes of the page');
});

test('sign-in methods offered', () => {
  const cfg = (browserSignIn, developmentTokens) => ({ oidc: browserSignIn ? { issuer: 'https://idp.test', cliClientId: 'cli' } : null, browserSignIn, developmentTokens });
  assert.deepEqual(a.signInChoices(cfg(true, false)), { browser: true, token: false, none: false });
  assert.deepEqual(a.signInChoices(cfg(false, true)), { browser: false, token: true, none: false });
  assert.deepEqual(a.signInChoices(cfg(true, true)), { browser: true, token: true, none: false });
  assert.deepEqual(a.signInChoices(cfg(false, false)), { browser: false, token: false, none: true });
  assert.deepEqual(a.signInChoices(null), { browser: false, token: true, none: false });
});

test('header and banner words', () => {
  const now = new Date(2025, 11, 1, 9, 30);
  const today = new Date(2025, 11, 1, 14, 5).toISOString();
  const tomorrow = new Date(2025, 11, 2, 8, 0).toISOString();
  assert.equal(a.signedInText({ user: 'alice@tether.test', expiresAt: today }, now), 'signed in as alice@tether.test until 14:05');
  assert.equal(a.signedInText({ user: 'alice@tether.test', expiresAt: tomorrow }, now), 'signed in as alice@tether.test until 2025-12-02 08:00');
  assert.equal(a.signedInText({ user: 'bob', expiresAt: null }, now), 'signed in as bob');
  assert.equal(a.signedInText({ user: 'bob', expiresAt: 'garbage' }, now), 'signed in as bob');
  assert.equal(a.signInAgainText('your sign-in expired'), 'Your sign-in expired');
  assert.equal(a.signInAgainText('you signed out.'), 'You signed out');
  assert.equal(a.signInAgainText(''), 'Your sign-in ended');
});
