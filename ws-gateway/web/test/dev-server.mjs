// A stand-in for the gateway, for working on the page without Kubernetes: serves dist/, answers
// /api/auth, /api/whoami, /api/login, /api/logout and /api/sessions for one development token,
// and proxies /ws/<ns>/<name> to a real session agent with an attach ticket it mints itself
// (Ed25519 JWT, the claims of protocol/src/ticket.rs). It forwards frames untouched, like the
// gateway does, and closes them with 4440 when their sign-in expires or is signed out.
//
//   node test/dev-server.mjs --agent 127.0.0.1:7681 --key agent-signing.pem --token dev \
//        --session default/dev --uid dev-uid [--listen 127.0.0.1:8080]
//        [--fake-oidc] [--no-dev-tokens] [--signin-ttl SECONDS]
//
// `--fake-oidc`: /api/auth offers browser sign-in, and /auth/login?next=P signs in at once and
// redirects to P (an identity provider that asks nothing), /auth/done is the popup's last page.
// `--no-dev-tokens`: /api/login answers 404. `--signin-ttl`: every sign-in ends after that long
// (whoami's expiresAt; open connections are then closed with 4440 "your sign-in expired").
// `--keygen DIR` writes DIR/ticket.key (PKCS#8) and DIR/ticket.pub (SPKI) for the agent.
import { createServer, request as httpRequest } from 'node:http';
import { createHash, createPrivateKey, generateKeyPairSync, randomBytes, sign, timingSafeEqual } from 'node:crypto';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join, normalize, dirname, extname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { WebSocketServer, WebSocket } from 'ws';

const { values: a } = parseArgs({
  options: {
    listen: { type: 'string', default: '127.0.0.1:8080' },
    agent: { type: 'string' },
    key: { type: 'string' },
    token: { type: 'string', default: 'dev' },
    user: { type: 'string', default: 'developer' },
    session: { type: 'string', default: 'default/dev' },
    uid: { type: 'string', default: 'dev-uid' },
    keygen: { type: 'string' },
    'fake-oidc': { type: 'boolean', default: false },
    'no-dev-tokens': { type: 'boolean', default: false },
    'signin-ttl': { type: 'string', default: '0' },
    csp: { type: 'string', default: "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'" },
  },
});

if (a.keygen) {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  writeFileSync(join(a.keygen, 'ticket.key'), privateKey.export({ type: 'pkcs8', format: 'pem' }));
  writeFileSync(join(a.keygen, 'ticket.pub'), publicKey.export({ type: 'spki', format: 'pem' }));
  process.exit(0);
}

const dist = join(dirname(fileURLToPath(import.meta.url)), '..', 'dist');
const key = createPrivateKey(readFileSync(a.key, 'utf8'));
const [ns, name] = a.session.split('/');
const sessionsCookie = 'tether_dev_session';
const ttlMs = Number(a['signin-ttl']) * 1000;
const devTokens = !a['no-dev-tokens'];
// `<via>.<expires ms or 0>.<mac>`: stable across restarts (like the gateway's signed cookie), so a
// restart does not sign anyone out.
const secret = createHash('sha256').update(readFileSync(a.key)).update(a.token).digest();
const mac = (body) => createHash('sha256').update(secret).update(body).digest('hex');
function mintCookie(via) {
  const body = `${via}.${ttlMs > 0 ? Date.now() + ttlMs : 0}`;
  return `${body}.${mac(body)}`;
}
/** The sign-in a request carries: `{ value, via, exp }`, or null (none, forged, expired). */
function signIn(req) {
  const c = (req.headers.cookie ?? '').split(/;\s*/).find((c) => c.startsWith(`${sessionsCookie}=`));
  if (!c) return null;
  const value = c.slice(sessionsCookie.length + 1);
  const [via, exp, m] = value.split('.');
  const want = Buffer.from(mac(`${via}.${exp}`));
  if (!m || m.length !== want.length || !timingSafeEqual(Buffer.from(m), want)) return null;
  const expMs = Number(exp);
  if (expMs && Date.now() >= expMs) return null;
  return { value, via, exp: expMs };
}
const setCookie = (value) => `${sessionsCookie}=${value}; HttpOnly; SameSite=Strict; Path=/`;
const safeNext = (n) => (typeof n === 'string' && n.startsWith('/') && !n.startsWith('//') && !n.startsWith('/\\') ? n : '/');
/** Open browser connections and the sign-in each was admitted with (closed with 4440 when it ends). */
const conns = new Set();
function signOutConnections(pred, reason) {
  for (const c of conns) if (pred(c)) c.client.close(4440, reason);
}
setInterval(() => signOutConnections((c) => c.exp && Date.now() >= c.exp, 'your sign-in expired'), 500).unref();

const b64 = (b) => Buffer.from(b).toString('base64url');
function ticket(mode) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64(JSON.stringify({ alg: 'EdDSA', typ: 'JWT' }));
  const claims = b64(JSON.stringify({ iss: 'tether-gateway', aud: 'tether-agent', sub: a.user, sid: a.session, suid: a.uid, mode, iat: now, exp: now + 30, jti: randomBytes(16).toString('hex') }));
  const sig = sign(null, Buffer.from(`${header}.${claims}`), key);
  return `${header}.${claims}.${b64(sig)}`;
}

const authed = (req) => signIn(req) !== null;
const types = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8' };

function json(res, status, body, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', ...headers });
  res.end(JSON.stringify(body));
}

const server = createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/api/auth') {
    return json(res, 200, { oidc: a['fake-oidc'] ? { issuer: `http://${req.headers.host}/fake-idp`, cliClientId: 'tether-cli' } : null, browserSignIn: a['fake-oidc'], developmentTokens: devTokens });
  }
  if (url.pathname === '/api/whoami') {
    const s = signIn(req);
    if (!s) return json(res, 401, { error: 'not signed in' });
    return json(res, 200, { user: a.user, groups: [], via: s.via === 'oidc' ? 'oidc' : 'development', expiresAt: s.exp ? new Date(s.exp).toISOString() : null });
  }
  if (url.pathname === '/auth/login' && a['fake-oidc']) {
    res.writeHead(302, { location: safeNext(url.searchParams.get('next')), 'set-cookie': setCookie(mintCookie('oidc')), 'cache-control': 'no-store' });
    return res.end();
  }
  if (url.pathname === '/auth/done') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'content-security-policy': a.csp, 'cache-control': 'no-store' });
    return res.end('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Signed in</title><script src="/assets/done.js" defer></script></head><body><p>Signed in. You can close this window.</p></body></html>');
  }
  if (url.pathname === '/api/login' && req.method === 'POST') {
    if (!devTokens) return json(res, 404, { error: 'development tokens are not enabled' });
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      let token = '';
      try {
        token = JSON.parse(body).token;
      } catch {}
      if (token !== a.token) return json(res, 401, { error: 'invalid token' });
      json(res, 200, { user: a.user }, { 'set-cookie': setCookie(mintCookie('development')) });
    });
    return;
  }
  if (url.pathname === '/favicon.ico') {
    res.writeHead(404);
    return res.end();
  }
  if (url.pathname === '/api/logout' && req.method === 'POST') {
    const s = signIn(req);
    // This stand-in cannot revoke a stateless cookie elsewhere; it signs out the connections
    // admitted with it, as the gateway does.
    if (s) signOutConnections((c) => c.cookie === s.value, 'you signed out');
    return json(res, 200, { endSessionUrl: null }, { 'set-cookie': `${sessionsCookie}=; Max-Age=0; Path=/` });
  }
  const info = { namespace: ns, name, phase: 'Ready', ready: true, message: 'dev server', canAttach: true, canObserve: true };
  if (url.pathname === '/api/sessions') {
    if (!authed(req)) return json(res, 401, { error: 'not signed in' });
    return json(res, 200, [info]);
  }
  if (url.pathname.startsWith('/api/sessions/')) {
    if (!authed(req)) return json(res, 401, { error: 'not signed in' });
    if (url.pathname !== `/api/sessions/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`) return json(res, 404, { error: 'no such session' });
    return json(res, 200, info);
  }
  const path = url.pathname === '/' ? '/index.html' : normalize(url.pathname);
  const file = join(dist, path);
  if (!file.startsWith(dist) || !existsSync(file)) {
    res.writeHead(404);
    return res.end('not found');
  }
  res.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream', 'content-security-policy': a.csp, 'x-content-type-options': 'nosniff' });
  res.end(readFileSync(file));
});

const wss = new WebSocketServer({ noServer: true, handleProtocols: (p) => (p.has('tether.v2') ? 'tether.v2' : false) });
server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://x');
  const m = /^\/ws\/([^/]+)\/([^/]+)$/.exec(url.pathname);
  const s = signIn(req);
  if (!s) {
    socket.end('HTTP/1.1 401 Unauthorized\r\n\r\n');
    return;
  }
  if (!m || `${decodeURIComponent(m[1])}/${decodeURIComponent(m[2])}` !== a.session) {
    socket.end('HTTP/1.1 403 Forbidden\r\n\r\n');
    return;
  }
  const mode = url.searchParams.get('mode') === 'observe' ? 'observe' : 'attach';
  wss.handleUpgrade(req, socket, head, (client) => {
    const entry = { client, cookie: s.value, exp: s.exp };
    conns.add(entry);
    client.on('close', () => conns.delete(entry));
    const upstream = new WebSocket(`ws://${a.agent}/attach`, 'tether.v2', { headers: { authorization: `Bearer ${ticket(mode)}` } });
    const pending = [];
    upstream.on('open', () => pending.splice(0).forEach((m) => upstream.send(m)));
    client.on('message', (m) => (upstream.readyState === WebSocket.OPEN ? upstream.send(m) : pending.push(m)));
    upstream.on('message', (m) => client.readyState === WebSocket.OPEN && client.send(m));
    const closeCode = (c) => (c === 1005 || c === 1006 || !c ? 1011 : c);
    upstream.on('close', (c, r) => client.readyState <= 1 && client.close(closeCode(c), r));
    client.on('close', (c, r) => upstream.readyState <= 1 && upstream.close(c === 1005 || c === 1006 || c === 4440 ? 1000 : c, r));
    upstream.on('error', () => client.readyState <= 1 && client.close(1011, 'agent unreachable'));
  });
});

const [host, port] = [a.listen.slice(0, a.listen.lastIndexOf(':')), Number(a.listen.slice(a.listen.lastIndexOf(':') + 1))];
server.listen(port, host, () => console.log(`dev server on http://${host}:${server.address().port}`));
for (const s of ['SIGINT', 'SIGTERM']) process.on(s, () => process.exit(0));
