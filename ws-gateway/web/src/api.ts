// The gateway's small JSON API. The session cookie is HttpOnly and set by the server (after the
// OIDC round trip through /auth/login, or POST /api/login with a development token); the page
// never sees or stores a token after handing it over.

/** `GET /api/auth`: how one signs in to this gateway (needs no sign-in). */
export interface AuthConfig {
  oidc: { issuer: string; cliClientId: string } | null;
  /** `/auth/login?next=…` works: the OIDC authorization code flow in the browser. */
  browserSignIn: boolean;
  /** `POST /api/login {"token"}` works (a development gateway); 404 otherwise. */
  developmentTokens: boolean;
}

/** `GET /api/whoami`. */
export interface WhoAmI {
  user: string;
  groups: string[];
  via: 'oidc' | 'development' | 'kubernetes';
  /** RFC 3339; when the sign-in ends (null: it does not, or the gateway cannot tell). */
  expiresAt: string | null;
}

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
export async function whoami(): Promise<WhoAmI> {
  const w = await getJson<Partial<WhoAmI>>('/api/whoami');
  return {
    user: typeof w.user === 'string' ? w.user : '',
    groups: Array.isArray(w.groups) ? w.groups : [],
    via: w.via ?? 'kubernetes',
    expiresAt: typeof w.expiresAt === 'string' && w.expiresAt ? w.expiresAt : null,
  };
}

export async function authConfig(): Promise<AuthConfig> {
  const a = await getJson<Partial<AuthConfig>>('/api/auth');
  return { oidc: a.oidc ?? null, browserSignIn: a.browserSignIn === true, developmentTokens: a.developmentTokens === true };
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

/**
 * Ends the gateway's session. `endSessionUrl`, when not null, is the identity provider's sign-out
 * (it comes back to the gateway's `/`): the caller navigates the whole page there.
 */
export async function logout(): Promise<{ endSessionUrl: string | null }> {
  const r = await fetch('/api/logout', { method: 'POST', credentials: 'same-origin', headers: { accept: 'application/json' } });
  if (!r.ok) throw new HttpError(r.status, await errorText(r));
  const j = (await r.json().catch(() => ({}))) as { endSessionUrl?: unknown };
  return { endSessionUrl: typeof j.endSessionUrl === 'string' && j.endSessionUrl ? j.endSessionUrl : null };
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
