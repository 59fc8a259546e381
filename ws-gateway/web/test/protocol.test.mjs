// The TypeScript codec against the byte examples of docs/protocol.md and the rules of
// protocol/src/frame.rs. Run: npm run test:unit (node's test runner; esbuild compiles the module).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { build } from 'esbuild';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = mkdtempSync(join(tmpdir(), 'tether-proto-'));
await build({ absWorkingDir: root, entryPoints: ['src/protocol.ts'], outfile: join(out, 'protocol.mjs'), bundle: true, format: 'esm', platform: 'neutral', logLevel: 'warning' });
const p = await import(join(out, 'protocol.mjs'));
rmSync(out, { recursive: true, force: true });

const bytes = (...b) => new Uint8Array(b);

test('documented client frames encode to the documented bytes', () => {
  assert.deepEqual(p.encodeOpen({ cols: 80, rows: 24 }), bytes(0x01, 0, 80, 0, 24));
  assert.deepEqual(p.encodeAck(0x0102n), bytes(0x05, 0, 0, 0, 0, 0, 0, 1, 2));
  assert.deepEqual(p.encodeResize({ cols: 1000, rows: 1 }), bytes(0x04, 0x03, 0xe8, 0, 1));
  assert.deepEqual(p.encodePing(9n), bytes(0x06, 0, 0, 0, 0, 0, 0, 0, 9));
  const id = new Uint8Array(16).fill(7);
  const r = p.encodeResume(id, 2n ** 64n - 2n, { cols: 120, rows: 40 });
  assert.equal(r.length, 29);
  assert.deepEqual(r.subarray(0, 17), bytes(0x02, ...id));
  assert.deepEqual(r.subarray(17), bytes(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0, 120, 0, 40));
});

test('sizes are clamped into 1..=1000 and input is split at the frame limit', () => {
  assert.deepEqual(p.encodeResize({ cols: 0, rows: 5000 }), bytes(0x04, 0, 1, 0x03, 0xe8));
  const frames = p.encodeInputs(new Uint8Array(p.MAX_INPUT * 2 + 3).fill(97));
  assert.deepEqual(frames.map((f) => f.length), [p.MAX_CLIENT_FRAME, p.MAX_CLIENT_FRAME, 4]);
  assert.ok(frames.every((f) => f[0] === 0x03));
  assert.equal(p.encodeInputs(new Uint8Array(0)).length, 0);
});

test('server frames decode; malformed ones are errors', () => {
  assert.deepEqual(p.decodeServerFrame(bytes(0x82, 0, 0, 0, 0, 0, 0, 0, 1, 0x41)), { type: 'output', offset: 1n, data: bytes(0x41) });
  const w = new Uint8Array(31);
  w[0] = 0x81;
  w.fill(1, 1, 17);
  w[17] = 1;
  new DataView(w.buffer).setUint32(18, 1 << 20);
  new DataView(w.buffer).setBigUint64(22, 42n);
  w[30] = 2;
  const d = p.decodeServerFrame(w);
  assert.equal(d.mode, 'observe');
  assert.equal(d.window, 1 << 20);
  assert.equal(d.offset, 42n);
  assert.equal(d.start, 'snapshot');
  assert.deepEqual(p.decodeServerFrame(bytes(0x84, 0xff, 0xff, 0xff, 0xff, 0x68, 0x69)), { type: 'exit', code: -1, reason: 'hi' });
  assert.deepEqual(p.decodeServerFrame(bytes(0x85, 0, 0, 0, 0, 0, 0, 0, 7)), { type: 'pong', nonce: 7n });
  for (const bad of [bytes(), bytes(0x82, 0, 0, 0, 0, 0, 0, 0, 1), w.subarray(0, 30), bytes(0x85, 0, 0, 0, 0, 0, 0, 0, 7, 0), bytes(0x05, 0, 0, 0, 0, 0, 0, 0, 1), bytes(0x84, 0, 0, 0, 0, 0xff), bytes(0x7f)]) {
    assert.throws(() => p.decodeServerFrame(bad), p.DecodeError);
  }
  const snap = new Uint8Array(14);
  snap[0] = 0x83;
  snap[10] = 80;
  snap[12] = 24;
  snap[13] = 0x04; // unknown flag
  assert.throws(() => p.decodeServerFrame(snap), p.DecodeError);
  w[30] = 0; // v1's "new" is not part of v2
  assert.throws(() => p.decodeServerFrame(w), p.DecodeError);
});

test('v2 agent frames: a SNAPSHOT chunk and SIZE', () => {
  assert.deepEqual(p.decodeServerFrame(bytes(0x83, 0, 0, 0, 0, 0, 0, 0, 2, 0, 80, 0, 24, 3, 0x78)), {
    type: 'snapshot',
    offset: 2n,
    size: { cols: 80, rows: 24 },
    more: true,
    truncated: true,
    data: bytes(0x78),
  });
  assert.deepEqual(p.decodeServerFrame(bytes(0x86, 0, 80, 0, 24)), { type: 'size', size: { cols: 80, rows: 24 } });
  for (const bad of [bytes(0x86, 0, 80, 0), bytes(0x86, 0, 0, 0, 24), bytes(0x83, 0, 0, 0, 0, 0, 0, 0, 2, 0, 80, 0, 24)]) {
    assert.throws(() => p.decodeServerFrame(bad), p.DecodeError);
  }
});

test('close codes: resume, reopen or end', () => {
  assert.equal(p.closeAction(1006, false), 'reconnect');
  assert.equal(p.closeAction(1001, false), 'reconnect');
  assert.equal(p.closeAction(4404, false), 'reopen');
  assert.equal(p.closeAction(4000, false), 'end');
  assert.equal(p.closeAction(4423, false), 'end');
  assert.equal(p.closeAction(4411, false), 'end');
  assert.equal(p.closeAction(1006, true), 'end');
});

test('close 4440 (gateway: sign-in ended) means sign in again and resume, not retry or end', () => {
  assert.equal(p.CLOSE_SIGNED_OUT, 4440);
  assert.equal(p.closeAction(4440, false), 'signin');
  assert.equal(p.closeAction(4440, true), 'end'); // the shell had exited: nothing to resume
  assert.ok(p.CLOSE_REASONS[4440]);
});
