// @ts-check
/**
 * The chatd JavaScript client: one ES module, no dependencies, for browsers and
 * Node.js (>= 20.10; on Node 20 run with --experimental-websocket, or pass a
 * WebSocket constructor).
 *
 * It owns the hard parts of docs/protocol.md so an application does not:
 * hello (and token refresh), subscriptions with cursors, resuming after any
 * disconnect (by seq, and by offset for replies in flight) with jittered
 * exponential backoff, exactly-once delivery to the application, pending
 * sends retried with the same id after a reconnect, replies with their live
 * partial text, stop, typing, and the connection's state.
 *
 * Events (an EventTarget; each is a CustomEvent, its data in `detail`):
 *   state       {state, previous}       connecting | live | reconnecting | closed
 *   resumed     {}                      live again after a reconnect, every
 *                                       subscription caught up
 *   message     {conv, message}         a committed message, once, in seq order
 *   reply       {conv, reply}           a reply started or grew (reply.text so far)
 *   replyend    {conv, reply}           a reply ended (reply.status: complete,
 *                                       stopped, interrupted); reply.text is final
 *   replyerror  {conv, reply, code, message}  a reply ended with nothing stored
 *   typing      {conv, user}
 *   unsubscribed {conv, reason}
 *   error       {code, message}         a problem the application should see
 */

/** @typedef {"idle"|"connecting"|"live"|"reconnecting"|"closed"} ConnectionState */

/**
 * @typedef {object} Message
 * @property {number} seq
 * @property {string} id
 * @property {string} user
 * @property {string} role
 * @property {string} status
 * @property {string} text
 * @property {number} ts
 */

/**
 * @typedef {object} Reply
 * @property {string} stream     the reply's id (its committed message has this id)
 * @property {string} conv
 * @property {number|null} replyTo   seq of the message it answers
 * @property {string} text       what is known so far (final once `done`)
 * @property {boolean} done
 * @property {string|null} status    complete | stopped | interrupted, once done
 * @property {number|null} seq       its message's seq, once committed
 * @property {string|null} error     a stream.error code (nothing was stored)
 */

/**
 * @typedef {object} Ack
 * @property {number} seq
 * @property {string} id
 * @property {boolean} duplicate   the message had already been committed (a retry)
 * @property {string|undefined} stream   the reply it started, if it asked for one
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [user]       anonymous (development) mode: the user's name
 * @property {string} [token]      jwt mode: a token
 * @property {() => Promise<string>} [getToken]  jwt mode: called for a fresh token
 *   before it expires and on every reconnect (preferred over `token`)
 * @property {any} [WebSocket]     a WebSocket constructor (default: the global one)
 * @property {number} [backoffInitialMs]  first reconnect delay (default 250)
 * @property {number} [backoffMaxMs]      longest reconnect delay (default 10000)
 * @property {number} [requestTimeoutMs]  an answer later than this means the
 *   connection is dead: it is dropped and resumed (default 15000)
 * @property {number} [typingIntervalMs]  at most one typing frame per
 *   conversation this often (default 2000)
 */

/** An error the server answered, or the client raised; `retryable` says whether trying again can help. */
export class ChatdError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {boolean} [retryable]
   */
  constructor(code, message, retryable = false) {
    super(`${code}: ${message}`);
    this.name = "ChatdError";
    this.code = code;
    this.retryable = retryable;
  }
}

/** Close codes after which reconnecting with the same credentials cannot help. */
const _FATAL_HELLO_CODES = new Set(["unauthorized", "token_expired", "bad_field"]);

/**
 * @typedef {object} _Conv
 * @property {string} conv
 * @property {boolean} wanted       the application subscribed (and did not unsubscribe)
 * @property {boolean} live         subscribed on the current connection
 * @property {number} lastSeq       the cursor: every seq up to it was delivered
 * @property {Message[]} messages   delivered messages, in seq order
 * @property {Map<string, Reply>} replies
 * @property {number} typingSentAt
 * @property {((value: any) => void)[]} waiters  subscribe() calls waiting for the first snapshot
 */

/**
 * @typedef {object} _Pending
 * @property {Record<string, any>} frame
 * @property {(value: any) => void} resolve
 * @property {(error: Error) => void} reject
 * @property {string} expect    the answer type that resolves it
 * @property {boolean} resend   sent again after a reconnect (idempotent sends)
 * @property {number} sentAt
 */

export class ChatdClient extends EventTarget {
  /**
   * @param {string} url  ws:// or wss:// address of chatd
   * @param {ClientOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = {
      backoffInitialMs: 250,
      backoffMaxMs: 10000,
      requestTimeoutMs: 15000,
      typingIntervalMs: 2000,
      ...options,
    };
    /** @type {ConnectionState} */
    this.state = "idle";
    /** The user chatd welcomed (null before the first welcome). @type {string|null} */
    this.user = null;
    /** @type {Map<string, _Conv>} */
    this._convs = new Map();
    /** Requests awaiting an answer, by ref. @type {Map<string, _Pending>} */
    this._pending = new Map();
    this._refs = 0;
    this._attempt = 0;
    /** @type {any} */
    this._ws = null;
    this._everLive = false;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._timer = null;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this._refreshTimer = null;
    /** @type {ReturnType<typeof setInterval>|null} */
    this._watchdog = null;
  }

  // -- the connection ---------------------------------------------------------

  /** Connect (and keep reconnecting until close()). Resolves once live. */
  connect() {
    if (this.state === "idle" || this.state === "closed") {
      this._open();
    }
    return this._until("live");
  }

  /** Close for good: pending requests are rejected, no reconnect. */
  close() {
    this._setState("closed");
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000, "client closed");
    for (const [ref, p] of this._pending) {
      this._pending.delete(ref);
      p.reject(new ChatdError("closed", "the client was closed", false));
    }
  }

  /**
   * Drop the connection as a network failure would (the client resumes on its
   * own). For tests and for an application that knows its network changed.
   */
  dropConnection() {
    if (this._ws) this._ws.close(4000, "dropped by the client");
  }

  /** @param {ConnectionState} state */
  _until(state) {
    if (this.state === state) return Promise.resolve();
    return new Promise((resolve, reject) => {
      /** @param {Event} e */
      const on = (e) => {
        const s = /** @type {CustomEvent} */ (e).detail.state;
        if (s === state) {
          this.removeEventListener("state", on);
          resolve(undefined);
        } else if (s === "closed") {
          this.removeEventListener("state", on);
          reject(this._fatal ?? new ChatdError("closed", "the client was closed"));
        }
      };
      this.addEventListener("state", on);
    });
  }

  /** @param {ConnectionState} state */
  _setState(state) {
    if (this.state === state) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous });
  }

  /** @param {string} type @param {any} detail */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _open() {
    this._setState(this._everLive ? "reconnecting" : "connecting");
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    if (!WS) {
      throw new ChatdError("no_websocket", "no WebSocket here: pass options.WebSocket");
    }
    let ws;
    try {
      ws = new WS(this.url);
    } catch (err) {
      this._emit("error", { code: "connect_failed", message: String(err) });
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (ws === this._ws) this._hello().catch((err) => this._helloFailed(err));
    };
    ws.onmessage = (/** @type {{data: any}} */ ev) => {
      if (ws !== this._ws) return;
      let frame;
      try {
        frame = JSON.parse(String(ev.data));
      } catch {
        this._emit("error", { code: "bad_frame", message: "the server sent a frame that is not JSON" });
        return;
      }
      this._onFrame(frame);
    };
    ws.onclose = (/** @type {{code: number, reason: string}} */ ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._onDisconnect(ev.code, ev.reason);
    };
    ws.onerror = () => {}; // a close follows; the reconnect happens there
  }

  async _hello() {
    let frame;
    if (this.options.getToken) {
      frame = { op: "hello", token: await this.options.getToken() };
    } else if (this.options.token) {
      frame = { op: "hello", token: this.options.token };
    } else {
      frame = { op: "hello", user: this.options.user ?? "anonymous" };
    }
    const welcome = await this._request(frame, "welcome");
    this.user = welcome.user;
    this._attempt = 0;
    this._scheduleRefresh(welcome.expires_in);
    this._startWatchdog();
    // Resume every subscription from its cursor, replies from their offsets,
    // before anything is sent: sends retried now are answered in order after.
    await Promise.all([...this._convs.values()].filter((c) => c.wanted).map((c) => this._rejoin(c)));
    for (const p of this._pending.values()) {
      if (p.resend) this._write(p.frame);
    }
    const resumed = this._everLive;
    this._everLive = true;
    this._setState("live");
    if (resumed) this._emit("resumed", {});
  }

  /** @param {any} err */
  _helloFailed(err) {
    if (err instanceof ChatdError && _FATAL_HELLO_CODES.has(err.code) && !this.options.getToken) {
      // The same credentials would be refused again: stop, say why.
      this._fatal = err;
      this._emit("error", { code: err.code, message: err.message });
      this.close();
      return;
    }
    if (this._ws) this._ws.close(4000, "hello failed");
  }

  /** @param {number} code @param {string} reason */
  _onDisconnect(code, reason) {
    this._clearTimers();
    for (const c of this._convs.values()) c.live = false;
    for (const [ref, p] of this._pending) {
      p.sentAt = 0; // the watchdog times each from when it is sent again
      if (!p.resend) {
        this._pending.delete(ref);
        p.reject(new ChatdError("disconnected", `the connection closed (${code} ${reason})`, true));
      }
    }
    if (this.state === "closed") return;
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    this._setState(this._everLive ? "reconnecting" : "connecting");
    const { backoffInitialMs, backoffMaxMs } = this.options;
    const ceiling = Math.min(backoffMaxMs, backoffInitialMs * 2 ** this._attempt);
    this._attempt += 1;
    // Full jitter between half and all of the ceiling: clients a deploy
    // disconnected together do not come back together.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this.state !== "closed") this._open();
    }, delay);
  }

  /** @param {number|undefined} expiresIn */
  _scheduleRefresh(expiresIn) {
    if (!this.options.getToken || !expiresIn) return;
    const getToken = this.options.getToken;
    // Refresh at 80% of the lifetime, on the live connection; expires_in is
    // rounded to the second, so half a second is taken off first, and at most
    // one refresh a second.
    const delay = Math.max(1000, (expiresIn - 0.5) * 800);
    this._refreshTimer = setTimeout(async () => {
      try {
        const answer = await this._request({ op: "refresh", token: await getToken() }, "refreshed");
        this._scheduleRefresh(answer.expires_in);
      } catch (err) {
        this._emit("error", { code: "refresh_failed", message: String(err) });
      }
    }, delay);
  }

  _startWatchdog() {
    // A request unanswered for requestTimeoutMs means a dead connection (the
    // network vanished without a close): drop it and resume.
    const limit = this.options.requestTimeoutMs;
    this._watchdog = setInterval(() => {
      const now = Date.now();
      for (const p of this._pending.values()) {
        if (p.sentAt && now - p.sentAt > limit) {
          this.dropConnection();
          return;
        }
      }
    }, Math.max(250, limit / 4));
    // In Node, the watchdog alone must not keep a process alive.
    /** @type {any} */ (this._watchdog).unref?.();
  }

  _clearTimers() {
    for (const t of [this._timer, this._refreshTimer]) if (t) clearTimeout(t);
    if (this._watchdog) clearInterval(this._watchdog);
    this._timer = this._refreshTimer = this._watchdog = null;
  }

  /** @param {Record<string, any>} frame */
  _write(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    const p = frame.ref !== undefined ? this._pending.get(String(frame.ref)) : undefined;
    if (p && frame.op !== "hello") p.sentAt = Date.now();
    return true;
  }

  /**
   * Send ``frame`` with a fresh ref and resolve with the answer of type ``expect``.
   * @param {Record<string, any>} frame
   * @param {string} expect
   * @param {{resend?: boolean, ref?: string}} [how]
   * @returns {Promise<any>}
   */
  _request(frame, expect, how = {}) {
    const ref = how.ref ?? `r${++this._refs}`;
    const full = { ...frame, ref };
    return new Promise((resolve, reject) => {
      this._pending.set(ref, { frame: full, resolve, reject, expect, resend: !!how.resend, sentAt: 0 });
      if (!this._write(full) && !how.resend) {
        this._pending.delete(ref);
        reject(new ChatdError("disconnected", "not connected", true));
      }
    });
  }

  // -- frames from the server -------------------------------------------------

  /** @param {any} f */
  _onFrame(f) {
    if (f.ref !== undefined && this._pending.has(String(f.ref))) {
      this._answer(String(f.ref), f);
      // A snapshot or ack is also state to apply; fall through for those.
      if (f.type !== "snapshot") return;
    }
    const c = f.conv !== undefined ? this._convs.get(f.conv) : undefined;
    switch (f.type) {
      case "snapshot":
        if (c) this._applySnapshot(c, f);
        return;
      case "message":
        if (c) this._applyMessage(c, f);
        return;
      case "stream.start":
        if (c) this._reply(c, f.stream, f.reply_to);
        return;
      case "delta":
        if (c) this._applyDelta(c, f);
        return;
      case "stream.end":
        if (c) this._endReply(c, f.stream, f.status, f.seq);
        return;
      case "stream.error":
        if (c) this._failReply(c, f);
        return;
      case "typing":
        if (c && f.user !== this.user) this._emit("typing", { conv: f.conv, user: f.user });
        return;
      case "unsubscribed":
        if (c) {
          c.wanted = c.live = false;
          this._emit("unsubscribed", { conv: f.conv, reason: f.reason ?? "" });
        }
        return;
      case "error":
        this._emit("error", { code: f.code, message: f.message });
        return;
      default:
        return; // a frame type this client does not know (protocol: ignore it)
    }
  }

  /** @param {string} ref @param {any} f */
  _answer(ref, f) {
    const p = /** @type {_Pending} */ (this._pending.get(ref));
    if (f.type === p.expect) {
      this._pending.delete(ref);
      p.resolve(f);
      return;
    }
    if (f.type !== "error") return; // e.g. a reply's stream.* never carries a ref
    if (f.retryable && p.resend) {
      // The server could not do it now (Postgres unavailable, rate limited):
      // the same frame again later; a send keeps its id, so it lands once.
      const wait = Math.max(f.retry_after_ms ?? 0, this.options.backoffInitialMs);
      p.sentAt = 0;
      setTimeout(() => this._pending.get(ref) === p && this._write(p.frame), wait);
      return;
    }
    this._pending.delete(ref);
    p.reject(new ChatdError(f.code, f.message ?? "", !!f.retryable));
  }

  /** @param {_Conv} c @param {any} f */
  _applySnapshot(c, f) {
    for (const m of f.messages ?? []) this._applyMessage(c, m);
    for (const s of f.streams ?? []) {
      const r = this._reply(c, s.stream, s.reply_to);
      // The snapshot's text starts at the offset this client said it had.
      if (!r.done) this._extend(c, r, s.offset, s.text);
    }
  }

  /** @param {_Conv} c @param {any} m */
  _applyMessage(c, m) {
    if (m.seq <= c.lastSeq) return; // already delivered: exactly once
    c.lastSeq = m.seq;
    /** @type {Message} */
    const message = {
      seq: m.seq,
      id: m.id,
      user: m.user,
      role: m.role,
      status: m.status,
      text: m.text,
      ts: m.ts,
    };
    c.messages.push(message);
    const r = c.replies.get(m.id);
    if (r && !r.error) {
      // The committed reply is the truth: the bubble locks to its text.
      const changed = r.text !== m.text;
      r.text = m.text;
      r.seq = m.seq;
      if (!r.done) this._endReply(c, r.stream, m.status, m.seq);
      else if (changed) this._emit("reply", { conv: c.conv, reply: r });
    }
    this._emit("message", { conv: c.conv, message });
  }

  /** @param {_Conv} c @param {string} stream @param {number|undefined} replyTo */
  _reply(c, stream, replyTo) {
    let r = c.replies.get(stream);
    if (!r) {
      r = {
        stream,
        conv: c.conv,
        replyTo: replyTo ?? null,
        text: "",
        done: false,
        status: null,
        seq: null,
        error: null,
      };
      c.replies.set(stream, r);
      this._emit("reply", { conv: c.conv, reply: r });
    }
    return r;
  }

  /** @param {_Conv} c @param {any} f */
  _applyDelta(c, f) {
    const r = this._reply(c, f.stream, undefined);
    if (!r.done) this._extend(c, r, f.offset, f.text);
  }

  /**
   * Offsets count code points; a repeat is ignored, a hole waits for the
   * committed message (which replaces the text).
   * @param {_Conv} c @param {Reply} r @param {number} offset @param {string} text
   */
  _extend(c, r, offset, text) {
    const have = [...r.text];
    const add = [...text];
    if (offset > have.length || offset + add.length <= have.length) return;
    r.text = have.join("") + add.slice(have.length - offset).join("");
    this._emit("reply", { conv: c.conv, reply: r });
  }

  /** @param {_Conv} c @param {string} stream @param {string} status @param {number} seq */
  _endReply(c, stream, status, seq) {
    const r = this._reply(c, stream, undefined);
    if (r.done) return;
    r.done = true;
    r.status = status;
    r.seq = seq ?? r.seq;
    // stream.end may come before the message: the text is final once the
    // message is applied (seq <= lastSeq); until then it is what the deltas said.
    this._emit("replyend", { conv: c.conv, reply: r });
  }

  /** @param {_Conv} c @param {any} f */
  _failReply(c, f) {
    const r = this._reply(c, f.stream, undefined);
    if (r.done) return;
    r.done = true;
    r.error = f.code;
    this._emit("replyerror", { conv: c.conv, reply: r, code: f.code, message: f.message ?? "" });
  }

  // -- conversations ----------------------------------------------------------

  /** @param {string} conv */
  _conv(conv) {
    let c = this._convs.get(conv);
    if (!c) {
      c = {
        conv,
        wanted: false,
        live: false,
        lastSeq: 0,
        messages: [],
        replies: new Map(),
        typingSentAt: 0,
        waiters: [],
      };
      this._convs.set(conv, c);
    }
    return c;
  }

  /**
   * What this client holds of ``conv``: its messages in seq order and its replies.
   * @param {string} conv
   */
  conversation(conv) {
    const c = this._conv(conv);
    return { conv, lastSeq: c.lastSeq, messages: c.messages, replies: c.replies };
  }

  /**
   * Subscribe (kept across reconnects). Resolves once caught up: every message
   * after ``after`` (default: where this client is, or the latest page) was
   * delivered as a ``message`` event.
   * @param {string} conv
   * @param {{after?: number}} [opts]
   */
  async subscribe(conv, opts = {}) {
    const c = this._conv(conv);
    if (opts.after !== undefined && opts.after > c.lastSeq) c.lastSeq = opts.after;
    c.wanted = true;
    if (this.state !== "live") {
      await this._until("live"); // the hello subscribes it
    } else {
      try {
        await this._join(c);
      } catch (err) {
        c.wanted = false;
        throw err;
      }
    }
    return this.conversation(conv);
  }

  /** @param {_Conv} c */
  async _join(c) {
    if (c.live) return;
    // Pages until a snapshot without `more` (that one makes this a live subscriber).
    for (;;) {
      /** @type {Record<string, any>} */
      const frame = { op: "subscribe", conv: c.conv };
      if (c.lastSeq > 0 || c.messages.length > 0) frame.after = c.lastSeq;
      const open = [...c.replies.values()].filter((r) => !r.done).slice(0, 64);
      if (open.length) {
        frame.streams = Object.fromEntries(open.map((r) => [r.stream, [...r.text].length]));
      }
      const snap = await this._request(frame, "snapshot");
      if (!snap.more) break;
    }
    c.live = true;
  }

  /**
   * After a reconnect: a conversation this user may no longer read ends its
   * subscription (an ``unsubscribed`` event); anything retryable drops the
   * connection and tries again.
   * @param {_Conv} c
   */
  async _rejoin(c) {
    try {
      await this._join(c);
    } catch (err) {
      if (!(err instanceof ChatdError) || err.retryable) throw err;
      c.wanted = false;
      this._emit("unsubscribed", { conv: c.conv, reason: err.message });
    }
  }

  /** @param {string} conv */
  async unsubscribe(conv) {
    const c = this._conv(conv);
    c.wanted = false;
    if (!c.live) return;
    c.live = false;
    await this._request({ op: "unsubscribe", conv }, "unsubscribed");
  }

  /**
   * Send a message; resolves with its ack once it is committed. The id is the
   * idempotency key: across disconnects the same frame is sent again until
   * answered, and the message is stored once.
   * @param {string} conv
   * @param {string} text
   * @param {{reply?: boolean, id?: string}} [opts]
   * @returns {Promise<Ack>}
   */
  async send(conv, text, opts = {}) {
    const id = opts.id ?? `c-${_randomId()}`;
    /** @type {Record<string, any>} */
    const frame = { op: "send", conv, id, text };
    if (opts.reply) frame.reply = true;
    const ack = await this._request(frame, "ack", { resend: true });
    if (ack.stream) this._reply(this._conv(conv), ack.stream, ack.seq);
    return { seq: ack.seq, id: ack.id, duplicate: !!ack.duplicate, stream: ack.stream };
  }

  /**
   * Stop a reply: it is committed with what it said so far, ``stopped``.
   * Asked while the connection is down (or answered with a retryable error),
   * the stop is sent again once it can be: a user's Stop survives a blip.
   * Rejects when the server refuses it (the reply has ended: ``unknown_stream``).
   * @param {string} conv @param {string} stream
   */
  async stop(conv, stream) {
    await this._request({ op: "stop", conv, stream }, "stopping", { resend: true });
  }

  /**
   * Tell the others this user is typing (at most once per typingIntervalMs per
   * conversation; dropped when not connected, as typing is).
   * @param {string} conv
   */
  typing(conv) {
    const c = this._conv(conv);
    const now = Date.now();
    if (now - c.typingSentAt < this.options.typingIntervalMs) return;
    c.typingSentAt = now;
    this._write({ op: "typing", conv });
  }

  /**
   * One page of older messages (not part of the live sequence).
   * @param {string} conv
   * @param {{before?: number, limit?: number}} [opts]
   * @returns {Promise<{messages: Message[], more: boolean}>}
   */
  async history(conv, opts = {}) {
    const page = await this._request({ op: "history", conv, ...opts }, "history");
    return { messages: page.messages, more: !!page.more };
  }
}

function _randomId() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}
