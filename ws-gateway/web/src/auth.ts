// The sign-in flow's decisions, free of the DOM so that test/auth.test.mjs runs them under node:
// where /auth/login sends the browser back to, how the route (the URL fragment, which the server
// never sees) survives the round trip through the identity provider, which sign-in methods the
// page offers, and the words of the header and the "sign in again" banner.

import type { AuthConfig } from './api';

/** Where the popup's sign-in ends: a gateway page that closes itself (`src/done.ts`). */
export const DONE_PATH = '/auth/done';
export const SIGNIN_POPUP_NAME = 'tether-signin';
export const SIGNIN_POPUP_FEATURES = 'popup,width=520,height=640';
/** `postMessage` type that `done.ts` sends its opener (a hint: the page polls /api/whoami anyway). */
export const SIGNED_IN_MESSAGE = 'tether-signed-in';
/** sessionStorage key holding the fragment across a full-page sign-in. */
export const HASH_KEY = 'tether.signin.hash';
/** A remembered fragment older than this is not restored (an abandoned sign-in). */
export const HASH_TTL_MS = 15 * 60_000;

/** A path on this gateway (one leading `/`, not `//host` nor `/\host`), else `/`. */
export function safeNext(next: string): string {
  return next.startsWith('/') && !next.startsWith('//') && !next.startsWith('/\\') ? next : '/';
}

/** The `next` for a full-page sign-in: the current path and query (the server never sees the fragment). */
export function nextOf(loc: { pathname: string; search: string }): string {
  return safeNext(loc.pathname + loc.search);
}

/** `/auth/login?next=<path>`. */
export function loginUrl(next: string): string {
  return `/auth/login?next=${encodeURIComponent(safeNext(next))}`;
}

export interface KeyValueStore {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** Before a full-page sign-in: keeps the route (e.g. `#/s/ns/name?mode=attach`) in sessionStorage. */
export function rememberHash(store: KeyValueStore, hash: string, now = Date.now()): void {
  if (!hash || hash === '#' || hash === '#/') {
    store.removeItem(HASH_KEY);
    return;
  }
  store.setItem(HASH_KEY, JSON.stringify({ hash, at: now }));
}

/**
 * On page load: the remembered route to put back, or null. It is forgotten either way, and only
 * restored when the page came back without a route of its own and within `HASH_TTL_MS`.
 */
export function takeHash(store: KeyValueStore, currentHash: string, now = Date.now()): string | null {
  const raw = store.getItem(HASH_KEY);
  if (raw === null) return null;
  store.removeItem(HASH_KEY);
  if (currentHash && currentHash !== '#') return null;
  try {
    const v = JSON.parse(raw) as { hash?: unknown; at?: unknown };
    if (typeof v.hash !== 'string' || !v.hash.startsWith('#/') || typeof v.at !== 'number') return null;
    const age = now - v.at;
    return age >= 0 && age < HASH_TTL_MS ? v.hash : null;
  } catch {
    return null;
  }
}

export interface SignInChoices {
  /** The "Sign in" button (OIDC in the browser). */
  browser: boolean;
  /** The development-token form. */
  token: boolean;
  /** Neither: say that the gateway has no sign-in method configured. */
  none: boolean;
}

/**
 * Which ways to sign in the page offers. `null` means /api/auth could not be read (a gateway
 * older than it, which only knew tokens): the token form alone, whose POST answers for itself.
 */
export function signInChoices(auth: AuthConfig | null): SignInChoices {
  if (!auth) return { browser: false, token: true, none: false };
  return { browser: auth.browserSignIn, token: auth.developmentTokens, none: !auth.browserSignIn && !auth.developmentTokens };
}

const pad = (n: number) => String(n).padStart(2, '0');

/** `14:05` when `expiresAt` is today (local time), `2025-12-02 14:05` otherwise, `''` when unknown. */
export function untilText(expiresAt: string | null, now: Date = new Date()): string {
  if (!expiresAt) return '';
  const t = new Date(expiresAt);
  if (Number.isNaN(t.getTime())) return '';
  const hm = `${pad(t.getHours())}:${pad(t.getMinutes())}`;
  const sameDay = t.getFullYear() === now.getFullYear() && t.getMonth() === now.getMonth() && t.getDate() === now.getDate();
  return sameDay ? hm : `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${hm}`;
}

/** The header's words: `signed in as alice@tether.test until 14:05`. */
export function signedInText(who: { user: string; expiresAt: string | null }, now: Date = new Date()): string {
  const until = untilText(who.expiresAt, now);
  return `signed in as ${who.user || 'an unnamed user'}${until ? ` until ${until}` : ''}`;
}

/** The banner's first words from the close reason: "your sign-in expired" → "Your sign-in expired". */
export function signInAgainText(reason: string): string {
  const r = reason.trim().replace(/[\s.]+$/, '') || 'your sign-in ended';
  return r[0].toUpperCase() + r.slice(1);
}
