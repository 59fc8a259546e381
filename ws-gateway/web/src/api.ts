// The gateway's small JSON API. The session cookie is HttpOnly and set by the server; the page
// never sees or stores a token after handing it to POST /api/login.

export interface SessionInfo {
  namespace: string;
  name: string;
  phase: string;
  ready: boolean;
  message?: string | null;
  canAttach: boolean;
  canObserve: boolean;
}

export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

async function errorText(r: Response): Promise<string> {
  const text = (await r.text().catch(() => '')).trim();
  if (text) {
    try {
      const j = JSON.parse(text) as { error?: string; message?: string; reason?: string };
      return j.error || j.message || j.reason || text;
    } catch {
      return text.slice(0, 300);
    }
  }
  return `${r.status} ${r.statusText}`;
}

async function getJson<T>(path: string): Promise<T> {
  const r = await fetch(path, { credentials: 'same-origin', headers: { accept: 'application/json' }, cache: 'no-store' });
  if (!r.ok) throw new HttpError(r.status, await errorText(r));
  return (await r.json()) as T;
}

/** Who the gateway thinks we are; a 401 HttpError when signed out. */
export async function whoami(): Promise<Record<string, unknown>> {
  return getJson<Record<string, unknown>>('/api/whoami');
}

export async function login(token: string): Promise<void> {
  const r = await fetch('/api/login', {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'content-type': 'application/json', accept: 'application/json' },
    body: JSON.stringify({ token }),
  });
  if (!r.ok) throw new HttpError(r.status, await errorText(r));
}

export async function logout(): Promise<void> {
  await fetch('/api/logout', { method: 'POST', credentials: 'same-origin' }).catch(() => undefined);
}

export async function sessions(): Promise<SessionInfo[]> {
  const list = await getJson<SessionInfo[] | { items: SessionInfo[] }>('/api/sessions');
  return Array.isArray(list) ? list : list.items;
}

/**
 * The answer the WebSocket upgrade to this session would get now: resolves when it would be
 * admitted, throws an HttpError with the gateway's words otherwise (401 signed out, 403 not
 * allowed, 404 unknown, 409 ended, 410 deleted, 503 not Ready yet).
 */
export async function sessionStatus(namespace: string, name: string, mode: string): Promise<SessionInfo> {
  return getJson<SessionInfo>(`/api/sessions/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}?mode=${encodeURIComponent(mode)}`);
}

/** A display name for whatever /api/whoami returns. */
export function userName(w: Record<string, unknown>): string {
  for (const k of ['user', 'username', 'name', 'sub']) {
    const v = w[k];
    if (typeof v === 'string' && v) return v;
    if (v && typeof v === 'object' && typeof (v as { name?: unknown }).name === 'string') return (v as { name: string }).name;
  }
  return '';
}
