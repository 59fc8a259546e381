// One terminal's connection to the gateway: opens or resumes the agent's client, feeds output to
// the screen in offset order, acknowledges what the screen has rendered, keeps the connection
// alive, and reconnects with backoff, resuming from the last offset it holds. When the user's
// sign-in ends (close 4440) it waits, screen and offsets intact, until `resume()` is called.

import {
  CLOSE_REASONS,
  CLOSE_SIGNED_OUT,
  DecodeError,
  SUBPROTOCOL,
  type Mode,
  type ServerFrame,
  type Size,
  type Snapshot,
  BACKOFF_RESET_AFTER_MS,
  backoff,
  closeAction,
  decodeServerFrame,
  encodeAck,
  encodeInputs,
  encodeOpen,
  encodePing,
  encodeResize,
  encodeResume,
  hex,
  MAX_SNAPSHOT_TOTAL,
} from './protocol';

/**
 * `signed-out`: the gateway closed with 4440 (or refused the upgrade with 401): nothing retries
 * until `resume()`; the client id and offsets are kept, so the resume loses nothing.
 */
export type ConnState = 'connecting' | 'live' | 'reconnecting' | 'read-only' | 'signed-out' | 'ended';

/** The screen the connection writes to (an xterm Terminal behind a thin adapter). */
export interface Screen {
  /** Writes bytes; `rendered` runs once the terminal has parsed and applied them. */
  write(data: Uint8Array, rendered: () => void): void;
  /** Clears the screen and its scrollback: a snapshot follows. */
  reset(): void;
  /**
   * The pane's size: the terminal renders at exactly this size (the driver's), letterboxed or
   * scrolled in a window of another size.
   */
  setSize(size: Size): void;
  /** A line of information from the page itself (not from the shell), clearly marked. */
  notice(text: string): void;
  /** The size this window could show: what an interactive client asks the pane to be. */
  size(): Size;
}

export interface ConnectionEvents {
  state(state: ConnState, detail: string): void;
}

export interface ConnectionOptions {
  url: string;
  mode: Mode;
  screen: Screen;
  events: ConnectionEvents;
  /** Keep-alive PING interval. */
  pingMs?: number;
  /** Without any frame for this long the connection is considered dead and replaced. */
  deadMs?: number;
  /** Unacknowledged rendered bytes are acknowledged after this idle time. */
  ackDelayMs?: number;
  /**
   * A connection that is not open after this long is given up and retried: a connect to a
   * replica that went away can hang for minutes (the browser's TCP timeout) otherwise.
   */
  connectMs?: number;
  /** `diagnose` gets this long to answer; then the attempt counts as a plain drop. */
  diagnoseMs?: number;
  /**
   * Called when a connection failed before the upgrade (the browser only sees code 1006 then):
   * resolves to a reason to stop with (not allowed, session gone), `{ retry }` with words to
   * show while retrying (the session is still starting), `{ signIn }` with words saying the
   * user is signed out (handled as close 4440: wait for `resume()`), or null to retry.
   */
  diagnose?: () => Promise<Diagnosis>;
  /**
   * Tests only: keep the output stream as received, up to this many bytes (0 = off), so a test
   * can check byte-exact resume independently of what the terminal keeps in its buffer.
   */
  captureBytes?: number;
}

export type Diagnosis = string | { retry: string } | { signIn: string } | null;

const te = new TextEncoder();

export class Connection {
  readonly opts: Required<ConnectionOptions>;
  private ws: WebSocket | null = null;
  private clientId: Uint8Array | null = null;
  /** Offset of the next output byte expected: everything before it was handed to the screen. */
  private received = 0n;
  /** Everything before this offset has been rendered by the terminal. */
  private rendered = 0n;
  /** Highest ACK sent on the current connection (never goes backwards, never ahead). */
  private acked = 0n;
  private window = 0;
  /** Bumps when a new client starts from 0, so late render callbacks of the old one are ignored. */
  private epoch = 0;
  private welcomed = false;
  private sawExit: { code: number; reason: string } | null = null;
  private attempt = 0;
  private retryTimer: number | undefined;
  private pingTimer: number | undefined;
  private ackTimer: number | undefined;
  private liveSince = 0;
  private lastFrameAt = 0;
  private stopped = false;
  private serverMode: Mode | null = null;
  private lastSize: Size | null = null;
  /** Where the output stood before a snapshot replaced it (for the notice). */
  private skippedFrom = 0n;
  /** Chunks of a snapshot whose last chunk has not come yet. */
  private partial: Snapshot[] = [];
  private partialBytes = 0;
  /** Something is on the screen that a snapshot would replace (for the notice). */
  private shown = false;
  private captured: Uint8Array[] = [];
  private capturedLen = 0;
  state: ConnState = 'connecting';
  detail = '';
  /** Counters for the test hook and the status line. */
  stats = { connects: 0, resumes: 0, snapshots: 0, reopens: 0, bytes: 0n, rttMs: NaN };

  constructor(opts: ConnectionOptions) {
    this.opts = { pingMs: 15_000, deadMs: 45_000, ackDelayMs: 50, connectMs: 10_000, diagnoseMs: 5_000, diagnose: async () => null, captureBytes: 0, ...opts };
  }

  get offset(): bigint {
    return this.received;
  }
  get renderedOffset(): bigint {
    return this.rendered;
  }
  get client(): string | null {
    return this.clientId ? hex(this.clientId) : null;
  }

  start(): void {
    this.connect();
  }

  /**
   * After `signed-out` (the user signed in again): connects again exactly as after a network
   * cut — RESUME with the same client id and the offset of the next byte expected, so no output
   * is lost or repeated. Does nothing in any other state.
   */
  resume(): void {
    if (this.stopped || this.state !== 'signed-out' || this.ws) return;
    window.clearTimeout(this.retryTimer);
    this.attempt = 0;
    this.setState('reconnecting', 'signed in again; resuming');
    this.connect();
  }

  /** Leaves the session: closes without ending it (the agent keeps the client for its grace). */
  stop(): void {
    this.stopped = true;
    window.clearTimeout(this.retryTimer);
    this.clearTimers();
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close(1000, 'page closed');
      this.ws = null;
    }
  }

  /** Keystrokes and pastes (xterm's onData: UTF-8 text). */
  input(text: string): void {
    this.sendInput(te.encode(text));
  }

  /** xterm's onBinary: a string whose code units are bytes. */
  inputBinary(s: string): void {
    const b = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) b[i] = s.charCodeAt(i) & 0xff;
    this.sendInput(b);
  }

  resize(size: Size): void {
    this.lastSize = size;
    if (!this.canWrite()) return;
    this.send(encodeResize(size));
  }

  /** Input and resize only from an interactive client that is live. */
  canWrite(): boolean {
    return this.welcomed && this.opts.mode === 'attach' && this.serverMode === 'attach' && this.ws?.readyState === WebSocket.OPEN;
  }

  private sendInput(data: Uint8Array): void {
    if (!this.canWrite()) return;
    for (const f of encodeInputs(data)) this.send(f);
  }

  private send(frame: Uint8Array): void {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(frame);
  }

  private setState(s: ConnState, detail = ''): void {
    this.state = s;
    this.detail = detail;
    this.opts.events.state(s, detail);
  }

  private connect(): void {
    if (this.stopped) return;
    if (this.stats.connects === 0) this.setState('connecting');
    this.welcomed = false;
    this.serverMode = null;
    this.stats.connects++;
    let ws: WebSocket;
    try {
      ws = new WebSocket(this.opts.url, [SUBPROTOCOL]);
    } catch (e) {
      this.setState('ended', `cannot connect: ${(e as Error).message}`);
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    let opened = false;
    const giveUp = window.setTimeout(() => {
      if (opened || ws !== this.ws) return;
      this.ws = null;
      ws.onclose = null;
      ws.close();
      this.onClose(1006, `could not connect within ${Math.round(this.opts.connectMs / 1000)} s`, false);
    }, this.opts.connectMs);
    ws.onopen = () => {
      opened = true;
      window.clearTimeout(giveUp);
      if (ws.protocol !== SUBPROTOCOL) {
        // A server that did not agree on the subprotocol speaks something else.
        ws.close(1002, 'subprotocol not agreed');
        return;
      }
      this.lastFrameAt = Date.now();
      const size = this.lastSize ?? this.opts.screen.size();
      if (this.clientId) {
        this.send(encodeResume(this.clientId, this.received, size));
      } else {
        this.send(encodeOpen(size));
      }
      this.pingTimer = window.setInterval(() => this.keepAlive(), Math.min(this.opts.pingMs, this.opts.deadMs / 3));
    };
    ws.onmessage = (ev: MessageEvent) => {
      if (ws !== this.ws) return;
      this.lastFrameAt = Date.now();
      if (typeof ev.data === 'string') {
        this.fail(ws, 'text message from server');
        return;
      }
      let f: ServerFrame;
      try {
        f = decodeServerFrame(ev.data as ArrayBuffer);
      } catch (e) {
        this.fail(ws, e instanceof DecodeError ? e.message : String(e));
        return;
      }
      this.onFrame(ws, f);
    };
    ws.onclose = (ev: CloseEvent) => {
      window.clearTimeout(giveUp);
      if (ws !== this.ws) return;
      this.ws = null;
      this.clearTimers();
      if (!opened && ev.code === 1006) {
        // A status request that hangs must not hold the page: then it is a plain drop.
        let late: number | undefined;
        const deadline = new Promise<Diagnosis>((done) => {
          late = window.setTimeout(() => done(null), this.opts.diagnoseMs);
        });
        void Promise.race([this.opts.diagnose(), deadline]).finally(() => window.clearTimeout(late)).then(
          (why) => {
            if (typeof why === 'string') this.end(why);
            else if (why && 'signIn' in why) this.onClose(CLOSE_SIGNED_OUT, why.signIn, ev.wasClean);
            else this.onClose(ev.code, why?.retry ?? ev.reason, ev.wasClean);
          },
          () => this.onClose(ev.code, ev.reason, ev.wasClean),
        );
        return;
      }
      this.onClose(ev.code, ev.reason, ev.wasClean);
    };
  }

  /** The server broke the protocol: close and start over from what we hold. */
  private fail(ws: WebSocket, why: string): void {
    console.error('tether: protocol error:', why);
    ws.close(4400, 'malformed frame');
    // onclose follows and reconnects.
  }

  private onFrame(ws: WebSocket, f: ServerFrame): void {
    if (!this.welcomed) {
      if (f.type !== 'welcome') {
        this.fail(ws, `expected WELCOME, got ${f.type}`);
        return;
      }
      this.onWelcome(ws, f);
      return;
    }
    if (this.partial.length > 0 && f.type !== 'snapshot') {
      this.fail(ws, `${f.type} between the chunks of a snapshot`);
      return;
    }
    switch (f.type) {
      case 'welcome':
        this.fail(ws, 'second WELCOME');
        return;
      case 'output': {
        if (f.offset !== this.received) {
          this.fail(ws, `output at offset ${f.offset}, expected ${this.received}`);
          return;
        }
        const end = f.offset + BigInt(f.data.length);
        this.received = end;
        this.stats.bytes += BigInt(f.data.length);
        if (this.capturedLen + f.data.length <= this.opts.captureBytes) {
          this.captured.push(f.data.slice());
          this.capturedLen += f.data.length;
        }
        // Copy: the frame's buffer is a view into the message, the terminal may queue the write.
        const epoch = this.epoch;
        this.shown = true;
        this.opts.screen.write(f.data.slice(), () => this.onRendered(epoch, end));
        return;
      }
      case 'snapshot': {
        const first = this.partial[0];
        if (first && (first.offset !== f.offset || first.size.cols !== f.size.cols || first.size.rows !== f.size.rows)) {
          this.fail(ws, `a snapshot chunk at ${f.offset} inside a snapshot at ${first.offset}`);
          return;
        }
        if (!first && f.offset < this.received) {
          this.fail(ws, `a snapshot at ${f.offset}, behind the output received (${this.received})`);
          return;
        }
        this.partialBytes += f.data.length;
        if (this.partialBytes > MAX_SNAPSHOT_TOTAL) {
          this.fail(ws, `a snapshot of more than ${MAX_SNAPSHOT_TOTAL} bytes`);
          return;
        }
        // Copy: the frame's buffer is a view into the message.
        this.partial.push({ ...f, data: f.data.slice() });
        if (f.more) return;
        const chunks = this.partial;
        this.partial = [];
        this.partialBytes = 0;
        this.applySnapshot(chunks);
        return;
      }
      case 'size':
        this.opts.screen.setSize(f.size);
        return;
      case 'exit':
        this.sawExit = { code: f.code, reason: f.reason };
        return;
      case 'pong': {
        const sent = Number(f.nonce);
        if (sent > 0) this.stats.rttMs = Date.now() - sent;
        return;
      }
    }
  }

  private onWelcome(ws: WebSocket, w: Extract<ServerFrame, { type: 'welcome' }>): void {
    const resumedFrom = this.clientId ? this.received : null;
    this.skippedFrom = this.received;
    if (resumedFrom !== null && hex(w.clientId) !== hex(this.clientId!)) {
      this.fail(ws, 'WELCOME names another client');
      return;
    }
    if (w.start === 'replay' && w.offset !== resumedFrom) {
      this.fail(ws, `replay from ${w.offset}, asked for ${resumedFrom}`);
      return;
    }
    this.partial = [];
    this.partialBytes = 0;
    if (w.start === 'snapshot') {
      // The snapshot that follows replaces everything: late render callbacks of what it
      // replaces must not acknowledge anything.
      this.epoch++;
      this.rendered = w.offset;
    }
    this.welcomed = true;
    this.clientId = w.clientId;
    this.window = w.window;
    this.serverMode = w.mode;
    this.received = w.offset;
    // The agent counts acknowledgements from the offset this connection starts at.
    this.acked = w.offset;
    this.liveSince = Date.now();
    if (resumedFrom !== null) this.stats.resumes++;
    const readOnly = w.mode === 'observe' || this.opts.mode === 'observe';
    this.setState(readOnly ? 'read-only' : 'live', readOnly ? 'observing: input is disabled' : '');
    // Tell a resumed interactive client our current size (it may have changed while away).
    if (!readOnly && this.lastSize && resumedFrom !== null) this.send(encodeResize(this.lastSize));
    // Anything rendered but not acknowledged before the break.
    this.scheduleAck();
  }

  /** A whole snapshot (its chunks in order): the screen and its scrollback start over. */
  private applySnapshot(chunks: Snapshot[]): void {
    const s = chunks[0];
    this.stats.snapshots++;
    // Mid-stream (a catch-up) the output stopped at `received`; after a WELCOME, where the
    // connection before it stopped.
    const from = this.received > this.skippedFrom ? this.received : this.skippedFrom;
    if (this.shown) {
      const gap = s.offset > from ? ` (output ${from}–${s.offset} was skipped)` : '';
      this.opts.screen.notice(
        `The terminal was redrawn from the server's snapshot${gap}: scrollback now holds the session's history as tmux kept it` +
          `${s.truncated ? ' (its oldest lines were cut)' : ''}, not what this page had shown.`,
      );
    }
    this.skippedFrom = s.offset;
    this.received = s.offset;
    if (this.acked < s.offset) this.acked = s.offset;
    this.opts.screen.reset();
    this.opts.screen.setSize(s.size);
    const epoch = this.epoch;
    const off = s.offset;
    chunks.forEach((c, i) => this.opts.screen.write(c.data, i === chunks.length - 1 ? () => this.onRendered(epoch, off) : () => {}));
    this.shown = true;
  }

  private onRendered(epoch: number, end: bigint): void {
    if (epoch !== this.epoch) return;
    if (end > this.rendered) this.rendered = end;
    const unacked = this.rendered - this.acked;
    if (unacked <= 0n) return;
    // Ack eagerly once a quarter of the window is waiting, otherwise shortly after output stops.
    if (this.window > 0 && unacked >= BigInt(Math.max(1, Math.floor(this.window / 4)))) {
      this.flushAck();
    } else {
      this.scheduleAck();
    }
  }

  private scheduleAck(): void {
    if (this.ackTimer !== undefined) return;
    this.ackTimer = window.setTimeout(() => {
      this.ackTimer = undefined;
      this.flushAck();
    }, this.opts.ackDelayMs);
  }

  private flushAck(): void {
    window.clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    if (!this.welcomed || !this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    // Never ahead of what this connection was sent, never backwards.
    const target = this.rendered < this.received ? this.rendered : this.received;
    if (target > this.acked) {
      this.acked = target;
      this.send(encodeAck(target));
    }
  }

  private keepAlive(): void {
    const ws = this.ws;
    if (!ws) return;
    if (Date.now() - this.lastFrameAt > this.opts.deadMs) {
      // Silent for too long: the path is dead even if the socket does not know yet.
      this.ws = null;
      ws.onclose = null;
      ws.close();
      this.clearTimers();
      this.onClose(4002, 'keep-alive timeout', false);
      return;
    }
    if (this.welcomed) this.send(encodePing(BigInt(Date.now())));
  }

  private clearTimers(): void {
    window.clearInterval(this.pingTimer);
    this.pingTimer = undefined;
    window.clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
  }

  private end(why: string): void {
    if (this.stopped) return;
    this.setState('ended', why);
  }

  private onClose(code: number, reason: string, _clean: boolean): void {
    if (this.stopped) return;
    const words = reason || CLOSE_REASONS[code] || `closed with code ${code}`;
    if (this.sawExit) {
      const e = this.sawExit;
      const status = e.code === 0 ? 'exited normally' : `exited with status ${e.code}`;
      this.setState('ended', `${e.reason || 'the shell'} ${status}`.trim());
      return;
    }
    const action = closeAction(code, false);
    if (action === 'end') {
      this.setState('ended', `${words} (${code})`);
      return;
    }
    if (action === 'signin') {
      // Keep the client id, the offsets and the screen; retry nothing until resume().
      this.liveSince = 0;
      this.attempt = 0;
      this.setState('signed-out', words);
      return;
    }
    if (action === 'reopen') {
      this.stats.reopens++;
      this.opts.screen.notice('the server no longer holds this terminal client; opening a new one (the screen is redrawn)');
      this.clientId = null;
      this.received = 0n;
      this.rendered = 0n;
      this.acked = 0n;
      this.epoch++;
    }
    // A connection that stayed live for a while resets the backoff.
    if (this.liveSince && Date.now() - this.liveSince > BACKOFF_RESET_AFTER_MS) this.attempt = 0;
    this.liveSince = 0;
    const delay = action === 'reopen' ? 0 : backoff(this.attempt++);
    this.setState('reconnecting', `${words}; retrying in ${(delay / 1000).toFixed(1)} s`);
    this.retryTimer = window.setTimeout(() => this.connect(), delay);
  }

  /** The captured output stream (see `captureBytes`), decoded as UTF-8. */
  capturedText(): string {
    const all = new Uint8Array(this.capturedLen);
    let o = 0;
    for (const c of this.captured) {
      all.set(c, o);
      o += c.length;
    }
    return new TextDecoder().decode(all);
  }

  /** Why the last connection attempt failed before the upgrade (the browser cannot tell). */
  wasEverWelcomed(): boolean {
    return this.clientId !== null;
  }
}

