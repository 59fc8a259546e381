// The page: sign-in, the list of sessions the user may open, and the terminal.
// Routes (hash based, so the gateway serves one index.html):
//   #/                                  session list (or the sign-in form when signed out)
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

import { HttpError, type SessionInfo, login, logout, sessionStatus, sessions, userName, whoami } from './api';
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
  renderer: 'webgl' | 'dom' | null;
  transcript(): string;
  /** Output bytes as received (only when a test set `window.__tetherCapture = true` before load). */
  stream(): string;
  offset(): string | null;
  stats(): Record<string, unknown> | null;
}
const hook: Hook = {
  view: 'loading',
  state: 'idle',
  detail: '',
  renderer: null,
  transcript: () => '',
  stream: () => '',
  offset: () => null,
  stats: () => null,
};
(window as unknown as { __tether: Hook }).__tether = hook;

// ---------------------------------------------------------------------------------------------
// Header: badge, user, notices.

const BADGE_TEXT: Record<ConnState, string> = {
  connecting: 'connecting',
  live: 'live',
  reconnecting: 'reconnecting',
  'read-only': 'read-only',
  ended: 'ended',
};

function setBadge(state: ConnState | 'idle', detail: string): void {
  hook.state = state;
  hook.detail = detail;
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
$('logout').addEventListener('click', () => {
  void logout().then(() => {
    location.hash = '#/';
    void route();
  });
});

// ---------------------------------------------------------------------------------------------
// Views.

let teardown: (() => void) | null = null;

function show(...nodes: Node[]): HTMLElement {
  const main = $('main');
  main.replaceChildren(...nodes);
  return main;
}

function loginView(reason?: string): void {
  hook.view = 'login';
  setBadge('idle', '');
  $('crumb').textContent = 'sign in';
  $('user').textContent = '';
  $('logout').hidden = true;
  const token = h('textarea', { id: 'token', name: 'token', rows: '4', required: true, autocomplete: 'off', spellcheck: 'false', placeholder: 'Paste an OIDC ID token or a Kubernetes token' });
  const err = h('p', { class: 'error', id: 'login-error', role: 'alert' });
  if (reason) err.textContent = reason;
  const submit = h('button', { type: 'submit', id: 'login-submit' }, 'Sign in');
  const form = h('form', { class: 'card login', id: 'login' }, h('h1', {}, 'Sign in to Tether'), h('label', { for: 'token' }, 'Token'), token, submit, err);
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
  show(form);
  token.focus();
}

function sessionHref(s: { namespace: string; name: string }, mode: Mode): string {
  return `#/s/${encodeURIComponent(s.namespace)}/${encodeURIComponent(s.name)}?mode=${mode}`;
}

async function sessionsView(): Promise<void> {
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

  const load = async () => {
    let list: SessionInfo[];
    try {
      list = await sessions();
    } catch (e) {
      if (e instanceof HttpError && e.status === 401) return loginView('Your sign-in expired.');
      status.textContent = `Could not list sessions: ${(e as Error).message}`;
      return;
    }
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
  const timer = window.setInterval(() => {
    if (document.visibilityState === 'visible') void load();
  }, 5000);
  teardown = () => window.clearInterval(timer);
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
  show(h('div', { class: 'term-wrap' }, searchBox, ended, host));

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
      notice: (text) => notice(text),
      size: () => ({ cols: term.cols, rows: term.rows }),
    },
    events: {
      state: (state, detail) => {
        setBadge(state, detail);
        ended.hidden = state !== 'ended';
        $('ended-text').textContent = state === 'ended' ? `Session ended: ${detail}` : '';
        if (state === 'ended') term.options.cursorBlink = false;
      },
    },
    diagnose: async () => {
      try {
        await sessionStatus(namespace, name, mode);
        return null; // it would be admitted now: the failure was transient, retry
      } catch (e) {
        if (!(e instanceof HttpError)) return null; // the gateway is down or restarting
        switch (e.status) {
          case 401:
            return 'signed out: sign in again';
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
  term.onResize(({ cols, rows }) => conn.resize({ cols, rows }));

  // Refit when the window or the layout changes, debounced so a drag sends one RESIZE.
  let fitTimer: number | undefined;
  const ro = new ResizeObserver(() => {
    window.clearTimeout(fitTimer);
    fitTimer = window.setTimeout(() => {
      try {
        fit.fit();
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

  conn.start();
  term.focus();
  teardown = () => {
    conn.stop();
    ro.disconnect();
    window.clearTimeout(fitTimer);
    term.dispose();
    hook.transcript = () => '';
    hook.stream = () => '';
    hook.offset = () => null;
    hook.stats = () => null;
    notice(null);
  };
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

async function route(): Promise<void> {
  teardown?.();
  teardown = null;
  hook.view = 'loading';
  let me: Record<string, unknown>;
  try {
    me = await whoami();
  } catch (e) {
    if (e instanceof HttpError && e.status === 401) return loginView();
    show(h('section', { class: 'card' }, h('h1', {}, 'Cannot reach the gateway'), h('p', { class: 'error' }, (e as Error).message), h('button', { type: 'button', id: 'retry' }, 'Retry')));
    $('retry').addEventListener('click', () => void route());
    return;
  }
  $('user').textContent = userName(me);
  $('logout').hidden = false;
  const m = /^#\/s\/([^/?]+)\/([^/?]+)(?:\?(.*))?$/.exec(location.hash);
  if (m) {
    const params = new URLSearchParams(m[3] ?? '');
    const mode: Mode = params.get('mode') === 'observe' ? 'observe' : 'attach';
    terminalView(decodeURIComponent(m[1]), decodeURIComponent(m[2]), mode, params.get('renderer'));
    return;
  }
  await sessionsView();
}

window.addEventListener('hashchange', () => void route());
void route();
