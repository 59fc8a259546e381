// src/connection.ts against a scripted WebSocket: close 4440 (the sign-in ended) keeps the client
// id and offsets and retries nothing; resume() then RESUMEs the same client at the next byte
// expected, exactly as after a network cut, so no output is lost or repeated.
// Run: npm run test:unit.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { build } from 'esbuild';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = mkdtempSync(join(tmpdir(), 'tether-conn-'));
await build({ absWorkingDir: root, entryPoints: ['src/connection.ts', 'src/protocol.ts'], outdir: out, outExtension: { '.js': '.mjs' }, bundle: true, format: 'esm', platform: 'neutral', logLevel: 'warning' });
const { Connection } = await import(join(out, 'connection.mjs'));
const p = await import(join(out, 'protocol.mjs'));
rmSync(out, { recursive: true, force: true });

class FakeSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.protocol = '';
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }
  send(b) {
    this.sent.push(new Uint8Array(b));
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }
  // Driven by the test:
  open() {
    this.readyState = 1;
    this.protocol = 'tether.v2';
    this.onopen?.();
  }
  frame(bytes) {
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }
  serverClose(code, reason) {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
}
globalThis.window = globalThis;
globalThis.WebSocket = FakeSocket;

const ID = new Uint8Array(16).map((_, i) => i + 1);
function welcome(offset, start) {
  const w = new Uint8Array(31);
  w[0] = 0x81;
  w.set(ID, 1);
  w[17] = 0; // attach
  new DataView(w.buffer).setUint32(18, 1 << 20);
  new DataView(w.buffer).setBigUint64(22, BigInt(offset));
  w[30] = { replay: 1, snapshot: 2 }[start];
  return w;
}
function snapshot(offset, text, { more = false, cols = 80, rows = 24 } = {}) {
  const d = new TextEncoder().encode(text);
  const b = new Uint8Array(14 + d.length);
  b[0] = 0x83;
  const v = new DataView(b.buffer);
  v.setBigUint64(1, BigInt(offset));
  v.setUint16(9, cols);
  v.setUint16(11, rows);
  b[13] = more ? 1 : 0;
  b.set(d, 14);
  return b;
}
function size(cols, rows) {
  const b = new Uint8Array(5);
  b[0] = 0x86;
  new DataView(b.buffer).setUint16(1, cols);
  new DataView(b.buffer).setUint16(3, rows);
  return b;
}
function output(offset, text) {
  const d = new TextEncoder().encode(text);
  const b = new Uint8Array(9 + d.length);
  b[0] = 0x82;
  new DataView(b.buffer).setBigUint64(1, BigInt(offset));
  b.set(d, 9);
  return b;
}

function harness(diagnose, extra = {}) {
  FakeSocket.all = [];
  const written = [];
  const states = [];
  const sizes = [];
  const notices = [];
  const conn = new Connection({
    url: 'ws://gateway.test/ws/ns/name?mode=attach',
    mode: 'attach',
    ackDelayMs: 1,
    diagnose,
    screen: {
      write: (data, rendered) => {
        written.push(new TextDecoder().decode(data));
        rendered();
      },
      reset: () => written.push('<reset>'),
      setSize: (s) => sizes.push(`${s.cols}x${s.rows}`),
      notice: (n) => notices.push(n),
      size: () => ({ cols: 80, rows: 24 }),
    },
    events: { state: (s, d) => states.push([s, d]) },
    ...extra,
  });
  return { conn, written, states, sizes, notices, sockets: FakeSocket.all };
}

test('4440: signed-out, nothing retried; resume() RESUMEs the same client at the same offset', async () => {
  const { conn, written, states, sockets } = harness();
  conn.start();
  const ws1 = sockets[0];
  ws1.open();
  assert.equal(ws1.sent[0][0], p.C.OPEN);
  ws1.frame(welcome(0, 'snapshot'));
  ws1.frame(snapshot(0, ''));
  ws1.frame(output(0, 'hello '));
  ws1.frame(output(6, 'world'));
  assert.equal(conn.state, 'live');
  assert.equal(conn.offset, 11n);

  ws1.serverClose(4440, 'your sign-in expired');
  assert.equal(conn.state, 'signed-out');
  assert.equal(conn.detail, 'your sign-in expired');
  await sleep(400); // longer than the first backoff step
  assert.equal(sockets.length, 1, 'no reconnect while signed out');
  assert.equal(conn.client, p.hex(ID), 'client id kept');
  assert.equal(conn.offset, 11n, 'offset kept');
  assert.equal(written.filter((w) => w === '<reset>').length, 1, 'screen kept (reset only by the first snapshot)');

  conn.resume();
  assert.equal(conn.state, 'reconnecting');
  assert.equal(sockets.length, 2);
  const ws2 = sockets[1];
  ws2.open();
  assert.deepEqual(ws2.sent[0], p.encodeResume(ID, 11n, { cols: 80, rows: 24 }), 'RESUME same client, next byte expected');
  ws2.frame(welcome(11, 'replay'));
  ws2.frame(output(11, '!'));
  assert.equal(conn.state, 'live');
  assert.equal(written.join(''), '<reset>hello world!', 'nothing lost, nothing repeated');
  assert.equal(conn.stats.resumes, 1);
  assert.equal(conn.stats.reopens, 0);
  assert.ok(states.some(([s]) => s === 'signed-out'));
  conn.resume(); // no effect while live
  assert.equal(sockets.length, 2);
  conn.stop();
});

test('an upgrade refused for want of a sign-in (1006, diagnosed 401) is handled as 4440', async () => {
  const { conn, sockets } = harness(async () => ({ signIn: 'you are no longer signed in' }));
  conn.start();
  sockets[0].open();
  sockets[0].frame(welcome(0, 'snapshot'));
  sockets[0].frame(snapshot(0, ''));
  sockets[0].frame(output(0, 'abc'));
  // The network cut: resumes by itself...
  sockets[0].serverClose(1006, '');
  assert.equal(conn.state, 'reconnecting');
  await sleep(450);
  assert.equal(sockets.length, 2);
  // ...but the upgrade is refused (the browser sees 1006 before open): the page asks, 401.
  sockets[1].serverClose(1006, '');
  await sleep(10);
  assert.equal(conn.state, 'signed-out');
  assert.equal(conn.detail, 'you are no longer signed in');
  await sleep(400);
  assert.equal(sockets.length, 2, 'no reconnect while signed out');
  conn.resume();
  sockets[2].open();
  assert.deepEqual(sockets[2].sent[0], p.encodeResume(ID, 3n, { cols: 80, rows: 24 }));
  conn.stop();
});

test('a cut still reconnects by itself; 4411 still ends', async () => {
  const { conn, sockets } = harness();
  conn.start();
  sockets[0].open();
  sockets[0].frame(welcome(0, 'snapshot'));
  sockets[0].frame(snapshot(0, ''));
  sockets[0].serverClose(4411, 'access revoked: may not attach');
  assert.equal(conn.state, 'ended');
  conn.resume();
  assert.equal(sockets.length, 1, 'resume() only acts after a sign-out');
  conn.stop();
});

test('a connection that never opens is given up after connectMs and retried', async () => {
  const { conn, sockets } = harness(undefined, { connectMs: 50 });
  conn.start();
  assert.equal(sockets.length, 1);
  // The socket neither opens nor closes, as a connect to a replica that went away.
  await sleep(120);
  assert.equal(sockets[0].closedWith !== null, true, 'the hanging socket is closed');
  assert.equal(conn.state, 'reconnecting');
  assert.match(conn.detail, /could not connect within/);
  await sleep(400); // the first backoff step
  assert.ok(sockets.length >= 2, `retried (${sockets.length} sockets)`);
  conn.stop();
});

test('a diagnosis that never answers counts as a drop after diagnoseMs', async () => {
  const { conn, sockets } = harness(() => new Promise(() => {}), { diagnoseMs: 50 });
  conn.start();
  sockets[0].serverClose(1006, '');
  await sleep(120);
  assert.equal(conn.state, 'reconnecting');
  await sleep(400);
  assert.ok(sockets.length >= 2, `retried (${sockets.length} sockets)`);
  conn.stop();
});

test('a snapshot in chunks is put together, resets the screen, takes its size, and a catch-up says what was skipped', () => {
  const { conn, written, sizes, notices, sockets } = harness();
  conn.start();
  const ws = sockets[0];
  ws.open();
  ws.frame(welcome(5, 'snapshot'));
  ws.frame(snapshot(5, 'his', { more: true, cols: 100, rows: 30 }));
  assert.deepEqual(written, [], 'nothing is written before the last chunk');
  ws.frame(snapshot(5, 'tory', { cols: 100, rows: 30 }));
  assert.deepEqual(written, ['<reset>', 'his', 'tory']);
  assert.deepEqual(sizes, ['100x30']);
  assert.deepEqual(notices, [], 'the first snapshot of a page is no news');
  ws.frame(output(5, 'abc'));
  ws.frame(size(90, 20));
  assert.deepEqual(sizes, ['100x30', '90x20']);
  // Fell behind: the agent skips it forward.
  ws.frame(snapshot(500, 'now', { cols: 90, rows: 20 }));
  assert.equal(conn.offset, 500n);
  assert.equal(notices.length, 1);
  assert.match(notices[0], /output 8–500 was skipped/);
  assert.equal(conn.state, 'live');
  conn.stop();
});

test('a frame between the chunks of a snapshot, or a snapshot going back, is a protocol error', () => {
  for (const bad of [
    (ws) => {
      ws.frame(snapshot(0, 'a', { more: true }));
      ws.frame(output(0, 'x'));
    },
    (ws) => {
      ws.frame(snapshot(0, 'a'));
      ws.frame(output(0, 'xyz'));
      ws.frame(snapshot(1, 'b'));
    },
    (ws) => {
      ws.frame(snapshot(0, 'a', { more: true }));
      ws.frame(snapshot(7, 'b'));
    },
  ]) {
    const { conn, sockets } = harness();
    conn.start();
    const ws = sockets[0];
    ws.open();
    ws.frame(welcome(0, 'snapshot'));
    bad(ws);
    assert.equal(ws.closedWith?.code, 4400);
    conn.stop();
  }
});
