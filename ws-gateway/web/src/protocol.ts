// The tether.v2 wire protocol, byte for byte as protocol/src/frame.rs and docs/protocol.md define
// it. Every WebSocket binary message is one frame: a type byte, a fixed big-endian header and,
// for some types, a payload to the end of the message. Client frames are 0x01..=0x7f, agent
// frames 0x81..=0xff. The decoder is strict: anything malformed is an error, never a guess.

export const SUBPROTOCOL = 'tether.v2';

/** Largest frame a client may send (type byte included). */
export const MAX_CLIENT_FRAME = 64 * 1024;
/** Largest INPUT payload. */
export const MAX_INPUT = MAX_CLIENT_FRAME - 1;
export const MAX_OUTPUT_CHUNK = 64 * 1024;
/** Largest payload of one SNAPSHOT chunk. */
export const MAX_SNAPSHOT = 64 * 1024;
/** Largest whole snapshot, all its chunks. */
export const MAX_SNAPSHOT_TOTAL = 32 * 1024 * 1024;
export const MAX_EXIT_REASON = 1024;
export const MAX_DIMENSION = 1000;

export const C = { OPEN: 0x01, RESUME: 0x02, INPUT: 0x03, RESIZE: 0x04, ACK: 0x05, PING: 0x06 } as const;
export const S = { WELCOME: 0x81, OUTPUT: 0x82, SNAPSHOT: 0x83, EXIT: 0x84, PONG: 0x85, SIZE: 0x86 } as const;

/** Another chunk of this snapshot follows. */
export const SNAPSHOT_FLAG_MORE = 0x01;
/** The agent kept only the newest history lines. */
export const SNAPSHOT_FLAG_TRUNCATED = 0x02;

export type Mode = 'attach' | 'observe';
/** How a connection's output starts (WELCOME `start`): 1 replay, 2 snapshot (0 is not valid). */
export type Start = 'replay' | 'snapshot';

export interface Size {
  cols: number;
  rows: number;
}

export interface Welcome {
  type: 'welcome';
  clientId: Uint8Array; // 16 bytes
  mode: Mode;
  window: number;
  offset: bigint;
  start: Start;
}
export interface Output {
  type: 'output';
  offset: bigint;
  data: Uint8Array;
}
/**
 * One chunk of a snapshot: written, chunk after chunk, to a terminal reset to `size`, the bytes
 * reproduce the pane (history, screen, cursor, modes) as of output offset `offset`.
 */
export interface Snapshot {
  type: 'snapshot';
  offset: bigint;
  size: Size;
  more: boolean;
  truncated: boolean;
  data: Uint8Array;
}
/** The pane's size from here on in the stream. */
export interface SizeFrame {
  type: 'size';
  size: Size;
}
export interface Exit {
  type: 'exit';
  code: number;
  reason: string;
}
export interface Pong {
  type: 'pong';
  nonce: bigint;
}
export type ServerFrame = Welcome | Output | Snapshot | Exit | Pong | SizeFrame;

export class DecodeError extends Error {}

/** Clamps a size into 1..=MAX_DIMENSION (the agent closes with 4416 otherwise). */
export function clampSize(s: Size): Size {
  const c = (n: number) => Math.min(MAX_DIMENSION, Math.max(1, Math.floor(n) || 1));
  return { cols: c(s.cols), rows: c(s.rows) };
}

function frame(type: number, len: number): [Uint8Array, DataView] {
  const b = new Uint8Array(1 + len);
  b[0] = type;
  return [b, new DataView(b.buffer)];
}

/** `OPEN cols:u16 rows:u16` */
export function encodeOpen(size: Size): Uint8Array {
  const s = clampSize(size);
  const [b, v] = frame(C.OPEN, 4);
  v.setUint16(1, s.cols);
  v.setUint16(3, s.rows);
  return b;
}

/** `RESUME client_id:[16] offset:u64 cols:u16 rows:u16` */
export function encodeResume(clientId: Uint8Array, offset: bigint, size: Size): Uint8Array {
  if (clientId.length !== 16) throw new Error('client id must be 16 bytes');
  const s = clampSize(size);
  const [b, v] = frame(C.RESUME, 16 + 8 + 4);
  b.set(clientId, 1);
  v.setBigUint64(17, offset);
  v.setUint16(25, s.cols);
  v.setUint16(27, s.rows);
  return b;
}

/** `INPUT bytes…`, split so that no frame exceeds MAX_CLIENT_FRAME. Empty input sends nothing. */
export function encodeInputs(data: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let i = 0; i < data.length; i += MAX_INPUT) {
    const chunk = data.subarray(i, Math.min(data.length, i + MAX_INPUT));
    const [b] = frame(C.INPUT, chunk.length);
    b.set(chunk, 1);
    out.push(b);
  }
  return out;
}

/** `RESIZE cols:u16 rows:u16` */
export function encodeResize(size: Size): Uint8Array {
  const s = clampSize(size);
  const [b, v] = frame(C.RESIZE, 4);
  v.setUint16(1, s.cols);
  v.setUint16(3, s.rows);
  return b;
}

/** `ACK offset:u64`: every output byte before `offset` has been consumed (rendered). */
export function encodeAck(offset: bigint): Uint8Array {
  const [b, v] = frame(C.ACK, 8);
  v.setBigUint64(1, offset);
  return b;
}

/** `PING nonce:u64` */
export function encodePing(nonce: bigint): Uint8Array {
  const [b, v] = frame(C.PING, 8);
  v.setBigUint64(1, nonce);
  return b;
}

function need(b: Uint8Array, exact: number | null, atLeast: number): void {
  if (exact !== null && b.length !== exact) {
    throw new DecodeError(`frame type 0x${b[0].toString(16)} needs ${exact} bytes, got ${b.length}`);
  }
  if (b.length < atLeast) {
    throw new DecodeError(`frame type 0x${b[0].toString(16)} needs ${atLeast} bytes, got ${b.length}`);
  }
}

function checkedSize(cols: number, rows: number): Size {
  if (cols < 1 || rows < 1 || cols > MAX_DIMENSION || rows > MAX_DIMENSION) {
    throw new DecodeError(`terminal size ${cols}x${rows} out of range 1..=${MAX_DIMENSION}`);
  }
  return { cols, rows };
}

const utf8Strict = new TextDecoder('utf-8', { fatal: true });

/** Decodes one agent frame. */
export function decodeServerFrame(buf: ArrayBuffer | Uint8Array): ServerFrame {
  const b = buf instanceof Uint8Array ? buf : new Uint8Array(buf);
  if (b.length === 0) throw new DecodeError('empty frame');
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  switch (b[0]) {
    case S.WELCOME: {
      need(b, 31, 31);
      const m = b[17];
      if (m > 1) throw new DecodeError(`unknown mode ${m}`);
      const st = b[30];
      if (st !== 1 && st !== 2) throw new DecodeError(`unknown start kind ${st}`);
      return {
        type: 'welcome',
        clientId: b.slice(1, 17),
        mode: m === 0 ? 'attach' : 'observe',
        window: v.getUint32(18),
        offset: v.getBigUint64(22),
        start: st === 1 ? 'replay' : 'snapshot',
      };
    }
    case S.OUTPUT: {
      need(b, null, 9);
      if (b.length === 9) throw new DecodeError('OUTPUT must carry a payload');
      if (b.length - 9 > MAX_OUTPUT_CHUNK) throw new DecodeError(`OUTPUT of ${b.length} bytes too large`);
      return { type: 'output', offset: v.getBigUint64(1), data: b.subarray(9) };
    }
    case S.SNAPSHOT: {
      need(b, null, 14);
      if (b.length - 14 > MAX_SNAPSHOT) throw new DecodeError(`SNAPSHOT chunk of ${b.length} bytes too large`);
      const flags = b[13];
      if (flags & ~(SNAPSHOT_FLAG_MORE | SNAPSHOT_FLAG_TRUNCATED)) {
        throw new DecodeError(`unknown snapshot flags 0x${flags.toString(16)}`);
      }
      return {
        type: 'snapshot',
        offset: v.getBigUint64(1),
        size: checkedSize(v.getUint16(9), v.getUint16(11)),
        more: (flags & SNAPSHOT_FLAG_MORE) !== 0,
        truncated: (flags & SNAPSHOT_FLAG_TRUNCATED) !== 0,
        data: b.subarray(14),
      };
    }
    case S.EXIT: {
      need(b, null, 5);
      if (b.length - 5 > MAX_EXIT_REASON) throw new DecodeError(`EXIT of ${b.length} bytes too large`);
      let reason: string;
      try {
        reason = utf8Strict.decode(b.subarray(5));
      } catch {
        throw new DecodeError('exit reason is not UTF-8');
      }
      return { type: 'exit', code: v.getInt32(1), reason };
    }
    case S.PONG:
      need(b, 9, 9);
      return { type: 'pong', nonce: v.getBigUint64(1) };
    case S.SIZE:
      need(b, 5, 5);
      return { type: 'size', size: checkedSize(v.getUint16(1), v.getUint16(3)) };
    default:
      throw new DecodeError(`unknown frame type 0x${b[0].toString(16).padStart(2, '0')}`);
  }
}

/** What the close codes of the protocol (protocol/src/close.rs) mean, in words a user reads. */
export const CLOSE_REASONS: Record<number, string> = {
  1000: 'session ended',
  1001: 'server shutting down',
  1006: 'connection lost',
  1008: 'refused by policy',
  1009: 'message too large',
  1011: 'server error',
  1012: 'server restarting',
  1013: 'server busy, try again later',
  4000: 'opened in another tab or window',
  4002: 'keep-alive timeout',
  4400: 'malformed frame',
  4401: 'attach ticket required',
  4403: 'attach ticket invalid',
  4404: 'the terminal client expired; opened a new one',
  4408: 'no OPEN or RESUME in time',
  4409: 'attach ticket already used',
  4410: 'attach ticket expired',
  4411: 'access revoked',
  4412: 'attach ticket is for another session',
  4413: 'frame too large',
  4416: 'terminal size out of range',
  4417: 'offset out of range',
  4423: 'read-only observer may not send input or resize',
  4429: 'too many clients',
  // Gateway only: the sign-in the connection was admitted with expired or was signed out (the
  // gateway's reason says which: "your sign-in expired" / "you signed out").
  4440: 'your sign-in ended',
  4500: 'internal error',
};

/** Gateway close code: sign in again, then resume the same client (nothing is lost). */
export const CLOSE_SIGNED_OUT = 4440;

/**
 * What a close means for the client:
 * - `reconnect`: resume where it left off, with backoff (a cut, a restart, a busy server);
 * - `reopen`: the agent forgot this client: OPEN a new one;
 * - `signin`: the user's sign-in ended (4440): keep the screen, stop retrying, and resume the
 *   same client (same id, same offset) once the user is signed in again;
 * - `end`: show the reason and stop.
 */
export type CloseAction = 'reconnect' | 'reopen' | 'signin' | 'end';

/**
 * What a client does after a close with this code (see `CloseAction`); after an EXIT, `end`.
 * The policy is `tether_protocol::reconnect` (protocol/src/reconnect.rs); a Rust test reads this
 * function and the `BACKOFF_*` constants and fails when they differ from it.
 */
export function closeAction(code: number, sawExit: boolean): CloseAction {
  if (sawExit) return 'end';
  switch (code) {
    case 1001: // agent or gateway draining: reconnect elsewhere
    case 1005: // no status
    case 1006: // network cut, gateway restart
    case 1011:
    case 1012:
    case 1013:
    case 4002: // keep-alive timeout
    case 4408: // handshake timeout
    case 4409: // a fresh ticket is minted for every connection
    case 4410:
    case 4429: // too many clients: retry with backoff
    case 4500:
      return 'reconnect';
    case 4404:
      return 'reopen';
    case CLOSE_SIGNED_OUT:
      return 'signin';
    default:
      return 'end';
  }
}

/** The first retry's wait (ms) before jitter; it doubles up to `BACKOFF_MAX_MS`. */
export const BACKOFF_FIRST_MS = 250;
export const BACKOFF_MAX_MS = 10_000;
/** Each wait is its base times a uniform factor in 1 ± this. */
export const BACKOFF_JITTER = 0.25;
/** A connection that stayed live this long starts the next backoff from the first wait. */
export const BACKOFF_RESET_AFTER_MS = 10_000;

/** The wait (ms) before retry number `attempt` (0 for the first), with jitter. */
export function backoff(attempt: number, unit: number = Math.random()): number {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** Math.min(attempt, 6));
  return Math.round(base * (1 - BACKOFF_JITTER + 2 * BACKOFF_JITTER * unit));
}

export function hex(id: Uint8Array): string {
  return Array.from(id, (b) => b.toString(16).padStart(2, '0')).join('');
}
