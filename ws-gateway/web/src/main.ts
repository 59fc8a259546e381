// The page: sign-in, the list of sessions the user may open, and the terminal.
// Routes (hash based, so the gateway serves one index.html):
//   #/                                  session list (or the sign-in view when signed out)
//   #/s/<namespace>/<name>?mode=attach  interactive terminal
//   #/s/<namespace>/<name>?mode=observe read-only terminal

// First: makes xterm's styles work under the gateway's CSP (see the file).
import './csp-styles';
import '@xterm/xterm/css/xterm.css';
import './style.css';

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { SearchAddon } from '@xterm/addon-search';
import { Unicode11Addon } from '@xterm/addon-unicode11';
import { WebLinksAddon } from '@xterm/addon-web-links';
import { WebglAddon } from '@xterm/addon-webgl';

import { type AuthConfig, HttpError, type SessionInfo, type WhoAmI, authConfig, login, logout, sessionStatus, sessions, whoami } from './api';
import {
  DONE_PATH,
  HASH_KEY,
  type KeyValueStore,
  SIGNED_IN_MESSAGE,
  SIGNIN_POPUP_FEATURES,
  SIGNIN_POPUP_NAME,
  loginUrl,
  nextOf,
  rememberHash,
  signInAgainText,
  signInChoices,
  signedInText,
  takeHash,
} from './auth';
import { type ConnState, Connection } from './connection';
import type { Mode } from './protocol';

// ---------------------------------------------------------------------------------------------
// Small DOM helpers (no innerHTML: names and messages come from the cluster).

type Attrs = Record<string, string | boolean | undefined>;
function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: (Node | string)[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    el.setAttribute(k, v === true ? '' : v);
  }
  el.append(...children);
  return el;
}
const $ = (id: string) => document.getElementById(id)!;

// ---------------------------------------------------------------------------------------------
// The test hook: lets tests assert on what is on screen without OCR.

interface Hook {
  view: 'loading' | 'login' | 'sessions' | 'terminal';
  state: ConnState | 'idle';
  detail: string;
  /** Who is signed in (`/api/whoami`'s `user`), '' when signed out. */
  user: string;
  /** The "sign in again" banner of a terminal is up (after close 4440). */
  signInAgain: boolean;
  renderer: 'webgl' | 'dom' | null;
  transcript(): string;
  /** Output bytes as received (only when a test set `window.__tetherCapture = true` before load). */
  stream(): string;
  offset(): string | null;
  stats(): Record<string, unknown> | null;
  /** The rows the viewport shows now (scrolled or not). */
  viewport(): string[];
  /** The terminal's selection (what the search addon found, or what the user selected). */
  selection(): string;
  scrollToBottom(): void;
  /** The last 40 connection states, with the time since load: what a failed test prints. */
  history: string[];
}
const hook: Hook = {
  view: 'loading',
  state: 'idle',
  detail: '',
  user: '',
  signInAgain: false,
  renderer: null,
  transcript: () => '',
  stream: () => '',
  offset: () => null,
  stats: () => null,
  viewport: () => [],
  selection: () => '',
  scrollToBottom: () => {},
  history: [],
};
(window as unknown as { __tether: Hook }).__tether = hook;

// ---------------------------------------------------------------------------------------------
// Header: badge, user, notices.

const BADGE_TEXT: Record<ConnState, string> = {
  connecting: 'connecting',
  live: 'live',
  reconnecting: 'reconnecting',
  'read-only': 'read-only',
  'signed-out': 'signed out',
  ended: 'ended',
};

function setBadge(state: ConnState | 'idle', detail: string): void {
  hook.state = state;
  hook.detail = detail;
  hook.history.push(`${(performance.now() / 1000).toFixed(1)}s ${state}${detail ? `: ${detail}` : ''}`);
  if (hook.history.length > 40) hook.history.shift();
  const b = $('badge');
  if (state === 'idle') {
    b.hidden = true;
    return;
  }
  b.hidden = false;
  b.dataset.state = state;
  b.textContent = state === 'ended' && detail ? `ended: ${detail}` : BADGE_TEXT[state];
  b.title = detail;
}

function notice(text: string | null): void {
  const n = $('notice');
  n.hidden = !text;
  $('notice-text').textContent = text ?? '';
}
$('notice-close').addEventListener('click', () => notice(null));

/** sessionStorage, or a stand-in that forgets when the browser refuses storage. */
function tabStore(): KeyValueStore {
  try {
    return window.sessionStorage;
  } catch {
    return { getItem: () => null, setItem: () => undefined, removeItem: () => undefined };
  }
}

/** Header: `signed in as alice@tether.test until 14:05` and the Sign out button. */
function showUser(me: WhoAmI | null): void {
  const u = $('user');
  hook.user = me?.user ?? '';
  $('logout').hidden = !me;
  if (!me) {
    u.textContent = '';
    u.removeAttribute('title');
    delete u.dataset.expiresAt;
    return;
  }
  u.textContent = signedInText(me);
  const groups = me.groups.length ? `; groups ${me.groups.join(', ')}` : '';
  const ends = me.expiresAt ? `; the sign-in ends ${new Date(me.expiresAt).toString()}` : '';
  u.title = `${me.user} (via ${me.via}${groups})${ends}`;
  if (me.expiresAt) u.dataset.expiresAt = me.expiresAt;
  else delete u.dataset.expiresAt;
}

function isWebUrl(u: string): boolean {
  try {
    return /^https?:$/.test(new URL(u, location.href).protocol);
  } catch {
    return false;
  }
}

/** A full-page sign-in that comes back here, with the route (fragment) kept in sessionStorage. */
function signInFullPage(): void {
  rememberHash(tabStore(), location.hash);
  location.assign(loginUrl(nextOf(location)));
}

$('logout').addEventListener('click', () => void signOut());

async function signOut(): Promise<void> {
  const button = $('logout') as HTMLButtonElement;
  button.disabled = true;
  // Leave the terminal first, so its connection closes as "page closed" and not with 4440.
  teardown?.();
  teardown = null;
  tabStore().removeItem(HASH_KEY);
  let endSessionUrl: string | null = null;
  try {
    ({ endSessionUrl } = await logout());
  } catch (e) {
    // 401: already signed out. Anything else: say so; route() shows whoever is still signed in.
    if (!(e instanceof HttpError && e.status === 401)) notice(`Sign-out failed: ${(e as Error).message}`);
  } finally {
    button.disabled = false;
  }
  if (endSessionUrl && isWebUrl(endSessionUrl)) {
    // The identity provider's sign-out; it comes back to the gateway's `/`.
    location.assign(endSessionUrl);
    return;
  }
  history.replaceState(null, '', `${location.pathname}${location.search}#/`);
  await route();
}

// ---------------------------------------------------------------------------------------------
// Views.

let teardown: (() => void) | null = null;

function show(...nodes: Node[]): HTMLElement {
  const main = $('main');
  main.replaceChildren(...nodes);
  return main;
}

/**
 * Signed out: the "Sign in" button (OIDC, `/auth/login?next=<path+query>`, the fragment kept in
 * sessionStorage) when the gateway offers browser sign-in, the development-token form when it
 * accepts development tokens, and words saying so when it offers neither.
 */
async function loginView(gen: number, reason?: string): Promise<void> {
  setBadge('idle', '');
  $('crumb').textContent = 'sign in';
  showUser(null);
  let auth: AuthConfig | null = null;
  let authError = '';
  try {
    auth = await authConfig();
  } catch (e) {
    authError = (e as Error).message;
  }
  if (gen !== generation) return;
  const choices = signInChoices(auth);
  const card = h('section', { class: 'card login', id: 'signin-view' }, h('h1', {}, 'Sign in to Tether'));
  if (reason) card.append(h('p', { class: 'error', id: 'signin-reason', role: 'alert' }, reason));
  let focus: HTMLElement | null = null;

  if (choices.browser) {
    const button = h('button', { type: 'button', id: 'signin', class: 'primary' }, 'Sign in');
    button.addEventListener('click', signInFullPage);
    let provider = 'your identity provider';
    try {
      if (auth?.oidc?.issuer) provider = new URL(auth.oidc.issuer).host;
    } catch {
      /* not a URL: keep the words */
    }
    card.append(h('p', { class: 'muted' }, `Sign in with your account at ${provider}.`), button);
    focus = button;
  }

  if (choices.token) {
    const token = h('textarea', { id: 'token', name: 'token', rows: '4', required: true, autocomplete: 'off', spellcheck: 'false', placeholder: 'Paste a development token' });
    const err = h('p', { class: 'error', id: 'login-error', role: 'alert' });
    const submit = h('button', { type: 'submit', id: 'login-submit', class: choices.browser ? 'secondary' : undefined }, 'Sign in with token');
    const form = h(
      'form',
      { class: 'login-token', id: 'login' },
      h('label', { for: 'token' }, 'Development token'),
      h('p', { class: 'muted' }, 'This gateway accepts development tokens: for development and tests, not for production.'),
      token,
      submit,
      err,
    );
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      submit.disabled = true;
      err.textContent = '';
      login(token.value.trim())
        .then(() => {
          token.value = '';
          return route();
        })
        .catch((e: unknown) => {
          err.textContent = e instanceof HttpError && e.status === 401 ? `Sign-in refused: ${e.message}` : `Sign-in failed: ${(e as Error).message}`;
        })
        .finally(() => (submit.disabled = false));
    });
    if (choices.browser) card.append(h('p', { class: 'or muted' }, 'or'));
    card.append(form);
    focus ??= token;
  }

  if (choices.none) {
    card.append(
      h(
        'p',
        { class: 'error', id: 'signin-unavailable' },
        'This gateway has no sign-in method configured: neither browser sign-in (OIDC) nor development tokens are enabled. Ask whoever runs it.',
      ),
    );
  }
  if (authError) card.append(h('p', { class: 'muted', id: 'signin-methods-error' }, `Could not ask the gateway how to sign in (${authError}).`));
  show(card);
  hook.view = 'login';
  focus?.focus();
}

function sessionHref(s: { namespace: string; name: string }, mode: Mode): string {
  return `#/s/${encodeURIComponent(s.namespace)}/${encodeURIComponent(s.name)}?mode=${mode}`;
}

async function sessionsView(gen: number): Promise<void> {
  hook.view = 'sessions';
  setBadge('idle', '');
  $('crumb').textContent = 'sessions';
  const tbody = h('tbody');
  const status = h('p', { class: 'muted', id: 'sessions-status' }, 'Loading…');
  const refresh = h('button', { type: 'button', class: 'link' }, 'Refresh');
  const table = h(
    'table',
    { class: 'sessions', id: 'sessions' },
    h('thead', {}, h('tr', {}, h('th', {}, 'Namespace'), h('th', {}, 'Name'), h('th', {}, 'Phase'), h('th', {}, 'Message'), h('th', {}, ''))),
    tbody,
  );
  show(h('section', { class: 'card wide' }, h('div', { class: 'row' }, h('h1', {}, 'Terminal sessions'), refresh), status, table));

  let timer: number | undefined;
  teardown = () => window.clearInterval(timer);
  const load = async () => {
    let list: SessionInfo[];
    try {
      list = await sessions();
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof HttpError && e.status === 401) {
        teardown?.();
        teardown = null;
        generation++;
        return loginView(generation, 'Your sign-in ended: sign in again.');
      }
      status.textContent = `Could not list sessions: ${(e as Error).message}`;
      return;
    }
    if (gen !== generation) return;
    list.sort((a, b) => a.namespace.localeCompare(b.namespace) || a.name.localeCompare(b.name));
    status.textContent = list.length ? '' : 'No sessions you may open. Create one with kubectl apply -f a TerminalSession manifest.';
    tbody.replaceChildren(
      ...list.map((s) => {
        const open = h('a', { class: 'button', href: sessionHref(s, 'attach'), 'data-action': 'open' }, 'Open');
        const observe = h('a', { class: 'button secondary', href: sessionHref(s, 'observe'), 'data-action': 'observe' }, 'Observe');
        if (!s.canAttach || !s.ready) disable(open, !s.canAttach ? 'You may not attach to this session' : `Not ready: ${s.phase}`);
        if (!s.canObserve || !s.ready) disable(observe, !s.canObserve ? 'You may not observe this session' : `Not ready: ${s.phase}`);
        return h(
          'tr',
          { 'data-session': `${s.namespace}/${s.name}` },
          h('td', {}, s.namespace),
          h('td', {}, s.name),
          h('td', {}, h('span', { class: 'phase', 'data-phase': s.phase }, s.phase || 'Unknown')),
          h('td', { class: 'message' }, s.message ?? ''),
          h('td', { class: 'actions' }, open, observe),
        );
      }),
    );
  };
  refresh.addEventListener('click', () => void load());
  await load();
  if (gen !== generation) return;
  timer = window.setInterval(() => {
    if (document.visibilityState === 'visible') void load();
  }, 5000);
}

function disable(a: HTMLAnchorElement, why: string): void {
  a.removeAttribute('href');
  a.setAttribute('aria-disabled', 'true');
  a.classList.add('disabled');
  a.title = why;
}

// ---------------------------------------------------------------------------------------------
// The terminal.

function terminalView(namespace: string, name: string, mode: Mode, renderer: string | null): void {
  hook.view = 'terminal';
  notice(null);
  $('crumb').textContent = `${namespace}/${name}${mode === 'observe' ? ' (observing)' : ''}`;
  const host = h('div', { id: 'terminal', class: 'terminal' });
  const searchInput = h('input', { type: 'search', id: 'search-input', placeholder: 'Find (Enter, Shift+Enter)', 'aria-label': 'Find in terminal' });
  const searchBox = h('div', { class: 'search', id: 'search', hidden: true }, searchInput, h('button', { type: 'button', class: 'link', id: 'search-close' }, 'Close'));
  const ended = h('div', { class: 'ended', id: 'ended', hidden: true }, h('span', { id: 'ended-text' }), h('button', { type: 'button', id: 'reconnect' }, 'Reconnect'), h('a', { href: '#/', class: 'button secondary' }, 'Sessions'));
  const again = signInAgainBanner();
  show(h('div', { class: 'term-wrap' }, searchBox, again.banner, ended, host));

  const term = new Terminal({
    allowProposedApi: true, // unicode11 needs it
    scrollback: 10_000,
    cursorBlink: mode === 'attach',
    disableStdin: mode === 'observe',
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Cascadia Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    theme: { background: '#101418', foreground: '#d8dee9', cursor: '#d8dee9', selectionBackground: '#3b4a5a' },
    // Bracketed paste stays on (the default): pasted text reaches the shell marked as a paste.
    ignoreBracketedPasteMode: false,
  });
  const fit = new FitAddon();
  const search = new SearchAddon();
  term.loadAddon(fit);
  term.loadAddon(search);
  term.loadAddon(new Unicode11Addon());
  term.unicode.activeVersion = '11';
  term.loadAddon(new WebLinksAddon());
  // OSC 52 would let anything printed in the shell write the user's clipboard: swallow it.
  term.parser.registerOscHandler(52, () => true);
  term.open(host);

  hook.renderer = 'dom';
  // `&renderer=dom` in the route skips WebGL (for comparisons and for checking the fallback).
  if (renderer !== 'dom') try {
    const gl = new WebglAddon();
    gl.onContextLoss(() => {
      gl.dispose();
      hook.renderer = 'dom';
    });
    term.loadAddon(gl);
    hook.renderer = 'webgl';
  } catch (e) {
    console.warn('tether: WebGL renderer unavailable, using the DOM renderer:', e);
  }
  fit.fit();

  const url = `${location.origin.replace(/^http/, 'ws')}/ws/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}?mode=${mode}`;
  const conn = new Connection({
    url,
    mode,
    captureBytes: (window as unknown as { __tetherCapture?: boolean }).__tetherCapture ? 8 << 20 : 0,
    screen: {
      write: (data, rendered) => term.write(data, rendered),
      reset: () => term.reset(),
      // The pane's size is the driver's: render exactly at it (the host scrolls or letterboxes).
      setSize: ({ cols, rows }) => {
        if (cols !== term.cols || rows !== term.rows) term.resize(cols, rows);
      },
      notice: (text) => notice(text),
      size: () => windowSize(),
    },
    events: {
      state: (state, detail) => {
        setBadge(state, detail);
        ended.hidden = state !== 'ended';
        $('ended-text').textContent = state === 'ended' ? `Session ended: ${detail}` : '';
        if (state === 'ended') term.options.cursorBlink = false;
        // 4440: the terminal and its buffer stay; once signed in again the same client resumes.
        if (state === 'signed-out') {
          showUser(null); // the header no longer claims a sign-in; it comes back with the resume
          again.open(detail);
        }
        else if (state === 'ended') again.close();
      },
    },
    diagnose: async () => {
      try {
        await sessionStatus(namespace, name, mode);
        return null; // it would be admitted now: the failure was transient, retry
      } catch (e) {
        if (!(e instanceof HttpError)) return null; // the gateway is down or restarting
        switch (e.status) {
          case 401: // the upgrade was refused for want of a sign-in: as close 4440
            return { signIn: 'you are no longer signed in' };
          case 403:
            return `not allowed: ${e.message}`;
          case 404: // unknown
          case 409: // ended: Succeeded, Expired or Failed
          case 410: // deleted
            return e.message;
          case 503: // not Ready yet, or the gateway cannot check right now
            return { retry: e.message };
          default:
            return null; // busy, rate-limited, agent unreachable: retry with backoff
        }
      }
    },
  });

  term.onData((d) => conn.input(d));
  term.onBinary((d) => conn.inputBinary(d));
  // What this window could show; an interactive client asks the pane for it (a RESIZE), and the
  // terminal follows the pane's size when the agent reports it.
  function windowSize(): { cols: number; rows: number } {
    const d = fit.proposeDimensions();
    return d && d.cols > 0 && d.rows > 0 ? { cols: d.cols, rows: d.rows } : { cols: term.cols, rows: term.rows };
  }

  // When the window or the layout changes (debounced, so a drag sends one RESIZE), ask for it.
  let fitTimer: number | undefined;
  const ro = new ResizeObserver(() => {
    window.clearTimeout(fitTimer);
    fitTimer = window.setTimeout(() => {
      try {
        conn.resize(windowSize());
      } catch {
        /* not visible */
      }
    }, 120);
  });
  ro.observe(host);

  // Search: Ctrl+Shift+F opens a small box; Enter / Shift+Enter find next / previous; Esc closes.
  const openSearch = () => {
    searchBox.hidden = false;
    searchInput.focus();
    searchInput.select();
  };
  const closeSearch = () => {
    searchBox.hidden = true;
    search.clearDecorations();
    term.focus();
  };
  term.attachCustomKeyEventHandler((e) => {
    if (e.type === 'keydown' && e.ctrlKey && e.shiftKey && (e.key === 'F' || e.key === 'f')) {
      e.preventDefault();
      openSearch();
      return false;
    }
    return true;
  });
  searchInput.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') closeSearch();
    else if (e.key === 'Enter') (e.shiftKey ? search.findPrevious : search.findNext).call(search, searchInput.value);
  });
  searchInput.addEventListener('input', () => search.findNext(searchInput.value, { incremental: true }));
  $('search-close').addEventListener('click', closeSearch);
  $('reconnect').addEventListener('click', () => void route());

  hook.transcript = () => transcript(term);
  hook.viewport = () => {
    const buf = term.buffer.active;
    const rows: string[] = [];
    for (let i = buf.viewportY; i < buf.viewportY + term.rows; i++) rows.push(buf.getLine(i)?.translateToString(true) ?? '');
    return rows;
  };
  hook.selection = () => term.getSelection();
  hook.scrollToBottom = () => term.scrollToBottom();
  hook.stream = () => conn.capturedText();
  hook.offset = () => conn.offset.toString();
  hook.stats = () => ({
    ...conn.stats,
    bytes: conn.stats.bytes.toString(),
    offset: conn.offset.toString(),
    rendered: conn.renderedOffset.toString(),
    client: conn.client,
    cols: term.cols,
    rows: term.rows,
    renderer: hook.renderer,
  });

  again.onSignedIn = (me) => {
    showUser(me);
    conn.resume();
    term.focus();
  };

  conn.start();
  term.focus();
  teardown = () => {
    again.close();
    conn.stop();
    ro.disconnect();
    window.clearTimeout(fitTimer);
    term.dispose();
    hook.transcript = () => '';
    hook.viewport = () => [];
    hook.selection = () => '';
    hook.scrollToBottom = () => {};
    hook.stream = () => '';
    hook.offset = () => null;
    hook.stats = () => null;
    notice(null);
  };
}

/**
 * The "sign in again" banner of a terminal whose connection was closed with 4440. While it is up
 * it polls /api/whoami every 2 s (and when the sign-in popup reports back or the window gets
 * focus); on 200 it closes and calls `onSignedIn`, which resumes the connection.
 *
 * - `#signin-again` (browser sign-in): `/auth/login?next=/auth/done` in a popup; when the popup is
 *   blocked, a full-page sign-in that comes back to this route (the terminal then opens afresh).
 * - `#signin-again-token` + `#signin-again-token-submit` (development tokens): POST /api/login.
 */
function signInAgainBanner() {
  const text = h('span', { id: 'signin-again-text' });
  const button = h('button', { type: 'button', id: 'signin-again', hidden: true }, 'Sign in again');
  const token = h('input', { type: 'password', id: 'signin-again-token', autocomplete: 'off', spellcheck: 'false', placeholder: 'Development token', 'aria-label': 'Development token' });
  const tokenSubmit = h('button', { type: 'submit', id: 'signin-again-token-submit' }, 'Sign in with token');
  const form = h('form', { class: 'inline', id: 'signin-again-form', hidden: true }, token, tokenSubmit);
  const error = h('span', { class: 'error', id: 'signin-again-error' });
  const none = h('span', { id: 'signin-again-unavailable', hidden: true }, 'This gateway has no sign-in method configured.');
  const banner = h('div', { class: 'signin-again', id: 'signin-again-banner', role: 'alert', hidden: true }, text, button, form, none, error);

  let auth: Promise<AuthConfig | null> | null = null;
  let poll: number | undefined;
  let checking = false;
  let popup: Window | null = null;
  let up = false;

  const self = {
    banner,
    onSignedIn: (_me: WhoAmI) => {},
    open(reason: string): void {
      text.textContent = `${signInAgainText(reason)}. Sign in again to continue: the terminal resumes where it stopped.`;
      error.textContent = '';
      banner.hidden = false;
      hook.signInAgain = true;
      if (up) return;
      up = true;
      auth ??= authConfig().catch(() => null);
      void auth.then((a) => {
        const c = signInChoices(a);
        // When /api/auth could not be read, offer the popup as well: the gateway answers for itself.
        button.hidden = !(c.browser || a === null);
        form.hidden = !c.token;
        none.hidden = !c.none;
        if (up && !button.hidden) button.focus();
      });
      poll = window.setInterval(() => void check(), 2000);
      window.addEventListener('message', onMessage);
      window.addEventListener('focus', onFocus);
    },
    close(): void {
      banner.hidden = true;
      hook.signInAgain = false;
      if (!up) return;
      up = false;
      window.clearInterval(poll);
      window.removeEventListener('message', onMessage);
      window.removeEventListener('focus', onFocus);
      try {
        if (popup && !popup.closed) popup.close();
      } catch {
        /* the popup is on another origin and not ours to close any more */
      }
      popup = null;
    },
  };

  const check = async () => {
    if (!up || checking) return;
    checking = true;
    try {
      const me = await whoami();
      if (!up) return;
      self.close();
      self.onSignedIn(me);
    } catch {
      /* 401: not yet; anything else: the gateway is restarting, try again at the next tick */
    } finally {
      checking = false;
    }
  };
  const onMessage = (e: MessageEvent) => {
    if (e.origin === location.origin && (e.data as { type?: unknown } | null)?.type === SIGNED_IN_MESSAGE) void check();
  };
  const onFocus = () => void check();

  button.addEventListener('click', () => {
    const w = window.open(loginUrl(DONE_PATH), SIGNIN_POPUP_NAME, SIGNIN_POPUP_FEATURES);
    if (!w) {
      // Popup blocked: sign in in this tab; the page comes back to this route and opens afresh.
      signInFullPage();
      return;
    }
    popup = w;
    w.focus();
  });
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    tokenSubmit.disabled = true;
    error.textContent = '';
    login(token.value.trim())
      .then(() => {
        token.value = '';
        return check();
      })
      .catch((e: unknown) => {
        error.textContent = e instanceof HttpError && e.status === 401 ? `Sign-in refused: ${e.message}` : `Sign-in failed: ${(e as Error).message}`;
      })
      .finally(() => (tokenSubmit.disabled = false));
  });
  return self;
}

/** The terminal's buffer as text: scrollback and screen, wrapped lines joined, trailing blanks cut. */
function transcript(term: Terminal): string {
  const buf = term.buffer.active;
  const lines: string[] = [];
  for (let i = 0; i < buf.length; i++) {
    const line = buf.getLine(i);
    if (!line) continue;
    const text = line.translateToString(true);
    if (line.isWrapped && lines.length) lines[lines.length - 1] += text;
    else lines.push(text);
  }
  while (lines.length && lines[lines.length - 1] === '') lines.pop();
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// Routing.

/** Bumps on every route(), so a view whose awaits finish after the user moved on renders nothing. */
let generation = 0;

async function route(): Promise<void> {
  teardown?.();
  teardown = null;
  const gen = ++generation;
  hook.view = 'loading';
  let me: WhoAmI;
  try {
    me = await whoami();
  } catch (e) {
    if (gen !== generation) return;
    if (e instanceof HttpError && e.status === 401) return loginView(gen);
    show(h('section', { class: 'card' }, h('h1', {}, 'Cannot reach the gateway'), h('p', { class: 'error' }, (e as Error).message), h('button', { type: 'button', id: 'retry' }, 'Retry')));
    $('retry').addEventListener('click', () => void route());
    return;
  }
  if (gen !== generation) return;
  showUser(me);
  const m = /^#\/s\/([^/?]+)\/([^/?]+)(?:\?(.*))?$/.exec(location.hash);
  if (m) {
    const params = new URLSearchParams(m[3] ?? '');
    const mode: Mode = params.get('mode') === 'observe' ? 'observe' : 'attach';
    terminalView(decodeURIComponent(m[1]), decodeURIComponent(m[2]), mode, params.get('renderer'));
    return;
  }
  await sessionsView(gen);
}

// Back from a full-page sign-in: the identity provider returned to `next` (path and query), the
// route the user was on waited in sessionStorage.
const restored = takeHash(tabStore(), location.hash);
if (restored) history.replaceState(null, '', `${location.pathname}${location.search}${restored}`);

window.addEventListener('hashchange', () => void route());
void route();
