// odin-client: a client of the Odin WebSocket server (protocol v1) for browsers and Node >= 18.
//
// One self-contained ES module, no dependencies. It keeps one connection open, tracks the
// position of every channel it delivers, reconnects with a jittered backoff (or after the
// server's `reconnect.after_ms`), subscribes again with `recover` so that nothing is missed
// or delivered twice, and tells plainly what could not be recovered (events "gap" and
// "recovered"). See docs/clients.md#javascript and docs/protocol.md.

/** The WebSocket subprotocol of protocol v1. */
export const SUBPROTOCOL = "odin.v1";

/** Token refusals in a row (401, 4011, 4012) after which a token provider is given up. */
const MAX_REFUSALS = 3;

/**
 * A position in a channel's history.
 * @typedef {{epoch: string, seq: number}} Position
 */

/**
 * An event as the server sends it (docs/protocol.md#events).
 * @typedef {object} OdinEvent
 * @property {string} type the payload's own `type`, or `<event>:update`
 * @property {string} channel `SYMBOL.event`
 * @property {number} seq its position in the history
 * @property {number} prev the position of the channel's previous message (0: none)
 * @property {string} epoch the name of the history the positions belong to
 * @property {number} ts when the history stored it, Unix ms
 * @property {any} data the publisher's JSON
 */

/**
 * A token, or a function that returns one (called on every connect and on `token_expiring`).
 * @typedef {string | (() => string | null | undefined | Promise<string | null | undefined>)} TokenSource
 */

/**
 * @typedef {object} ConnectOptions
 * @property {TokenSource} [token] a JWT, or a function returning one
 * @property {"subprotocol" | "message"} [tokenIn] how the token is sent: in the subprotocol
 *   list (`odin.token.<jwt>`, the default: a refused token fails the upgrade with 401, which a
 *   browser cannot tell from a network failure) or as the first message (`auth`: a refused
 *   token closes with 4012 and its reason)
 * @property {any} [WebSocket] the WebSocket constructor; default `globalThis.WebSocket`
 *   (in Node 18 and 20 pass the `ws` package's)
 * @property {number} [minDelay] shortest reconnect backoff, ms (250)
 * @property {number} [maxDelay] longest reconnect backoff, ms (10000)
 * @property {boolean} [replayGaps] on a gap, fetch the missed range with `replay` and
 *   deliver it in order (false)
 * @property {number} [heartbeat] ms between heartbeats when the socket is quiet; a missing
 *   pong within as long again closes and reconnects (25000; 0: none)
 * @property {number} [connectTimeout] ms a connection may take to be ready (hello, and
 *   auth_ok with `tokenIn: "message"`) before it is given up and tried again (10000)
 */

/**
 * @typedef {object} ConnectedInfo
 * @property {string} connectionId the server's id of this connection
 * @property {any} hello the server's `hello` message
 */
/**
 * @typedef {object} DisconnectedInfo
 * @property {number} code the close code (1006: no close frame)
 * @property {string} reason the close reason
 * @property {boolean} willReconnect false once the client has stopped for good
 * @property {number} delay ms until the next attempt (0 when not reconnecting)
 */
/**
 * @typedef {object} GapInfo
 * @property {string} channel
 * @property {number} from first position that holds a message you will not get
 * @property {number} to last such position
 * @property {string} reason the server's (`conflated`, ...), `missed` when the client saw
 *   an event whose `prev` skips positions, or a replay's reason
 */
/**
 * @typedef {object} RecoveredInfo
 * @property {string} channel
 * @property {boolean} recovered true: every missed event follows; false: the channel's
 *   latest event follows (reload your state from it)
 * @property {number} count how many missed events the server replays
 * @property {string} [reason] why not recovered (`epoch_changed`, `history_expired`, ...)
 */
/**
 * @typedef {object} ErrorInfo
 * @property {string} code the server's error code, or the client's: `TOKEN_INVALID`,
 *   `AUTH_REQUIRED` (the client gave up: the server refused its token), `HANDLER_ERROR` (a
 *   handler threw), `TOKEN_PROVIDER` (the token function failed), `INVALID_FRAME`,
 *   `CONNECT_FAILED`, `SEND_FAILED`
 * @property {string} message
 * @property {any} [error] the exception, for client-side problems
 * @property {any} [request] the server's error message, for server errors
 */
/**
 * @typedef {object} TokenInfo
 * @property {string | null} sub the token's subject
 * @property {number | null} expiresAt its expiry, Unix ms (null: none)
 */

/**
 * @typedef {object} EventMap
 * @property {ConnectedInfo} connected
 * @property {DisconnectedInfo} disconnected
 * @property {GapInfo} gap
 * @property {RecoveredInfo} recovered
 * @property {ErrorInfo} error
 * @property {TokenInfo} token
 */

/**
 * What `subscribe` returns.
 * @typedef {object} Subscription
 * @property {string[]} channels its channels and patterns
 * @property {() => void} unsubscribe stop it (patterns another subscription holds stay
 *   subscribed)
 */

/**
 * Whether `pattern` (`BTC.*`, `*.trade`, `*.*` or a channel) covers `channel`.
 * @param {string} pattern
 * @param {string} channel
 * @returns {boolean}
 */
export function matches(pattern, channel) {
  const wanted = pattern.split(".");
  const parts = channel.split(".");
  return wanted.length === parts.length && wanted.every((w, i) => w === "*" || w === parts[i]);
}

/**
 * The claims of a JWT, unverified (for the "token" event); null if it is not one.
 * @param {string} token
 * @returns {{sub: string | null, expiresAt: number | null} | null}
 */
function claimsOf(token) {
  try {
    const part = token.split(".")[1];
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(base64 + "=".repeat((4 - (base64.length % 4)) % 4));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return {
      sub: typeof claims.sub === "string" ? claims.sub : null,
      expiresAt: typeof claims.exp === "number" ? claims.exp * 1000 : null,
    };
  } catch {
    return null;
  }
}

/**
 * @typedef {object} SubscriptionState
 * @property {number} id
 * @property {string[]} patterns
 * @property {(event: OdinEvent) => void} fn
 * @property {boolean} acknowledged the server acknowledged it at least once
 * @property {boolean} active acknowledged on the current connection: its events flow
 * @property {boolean} closed
 */

/**
 * A replay in flight for a gap: events of the channel after `to` wait in `held`.
 * @typedef {object} PendingReplay
 * @property {string} id
 * @property {number} from
 * @property {number} to
 * @property {any[]} held
 */

/**
 * A client of an Odin server, kept connected until `close()`. Made by `connect()`.
 */
export class OdinClient {
  /**
   * @param {string} url `ws://host:3002/ws` or `wss://...`
   * @param {ConnectOptions} [options]
   */
  constructor(url, options = {}) {
    /** @readonly */
    this.url = url;
    /** @private */
    this._token = options.token;
    /** @private */
    this._tokenIn = options.tokenIn ?? "subprotocol";
    /** @private */
    this._WebSocket = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    /** @private */
    this._minDelay = options.minDelay ?? 250;
    /** @private */
    this._maxDelay = Math.max(options.maxDelay ?? 10000, this._minDelay);
    /** @private */
    this._replayGaps = options.replayGaps ?? false;
    /** @private */
    this._heartbeat = options.heartbeat ?? 25000;
    /** @private */
    this._connectTimeout = options.connectTimeout ?? 10000;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError(
        "odin-client: no WebSocket: pass options.WebSocket (in Node < 22, the ws package's)",
      );
    }
    if (this._tokenIn !== "subprotocol" && this._tokenIn !== "message") {
      throw new TypeError('odin-client: tokenIn must be "subprotocol" or "message"');
    }
    /**
     * Per channel, the position after the last event delivered (or from the ack).
     * @type {Map<string, Position>}
     */
    this.positions = new Map();
    /** Whether a connection is open and ready (after `hello`). */
    this.connected = false;
    /**
     * The current connection's id (from `hello`); null while offline.
     * @type {string | null}
     */
    this.connectionId = null;
    /** How many connections have been established. */
    this.connections = 0;
    /** @private @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /** @private @type {Map<number, SubscriptionState>} */
    this._subs = new Map();
    /** @private */
    this._numbers = 0;
    /** @private @type {any} */
    this._ws = null;
    /** @private */
    this._closed = false;
    /** @private */
    this._failures = 0;
    /** @private */
    this._refusals = 0;
    /** @private @type {number | null} */
    this._reconnectAfter = null;
    /** @private @type {any} */
    this._retryTimer = null;
    /** @private @type {any} */
    this._beatTimer = null;
    /** @private @type {any} */
    this._connectTimer = null;
    /** @private */
    this._awaitingPong = false;
    /** @private @type {Map<string, SubscriptionState[]>} */
    this._requests = new Map();
    /** @private @type {Map<string, PendingReplay>} */
    this._pending = new Map();
    /** @private @type {Array<() => void>} */
    this._readyWaiters = [];
    /** @private @type {any} */
    this._hello = null;
    this._open();
  }

  // ---- the user's side ------------------------------------------------------------------

  /**
   * Listen to one of the client's events.
   * @template {keyof EventMap} K
   * @param {K} name
   * @param {(info: EventMap[K]) => void} fn
   * @returns {this}
   */
  on(name, fn) {
    let set = this._handlers.get(name);
    if (!set) this._handlers.set(name, (set = new Set()));
    set.add(fn);
    return this;
  }

  /**
   * Stop listening.
   * @template {keyof EventMap} K
   * @param {K} name
   * @param {(info: EventMap[K]) => void} fn
   * @returns {this}
   */
  off(name, fn) {
    this._handlers.get(name)?.delete(fn);
    return this;
  }

  /**
   * Subscribe to channels or patterns (`BTC.trade`, `BTC.*`, `*.trade`); `fn` gets their
   * events in order, once each, across reconnects.
   * @param {string | string[]} channels
   * @param {(event: OdinEvent) => void} fn
   * @returns {Subscription}
   */
  subscribe(channels, fn) {
    if (this._closed) throw new Error("odin-client: the client is closed");
    const patterns = [...new Set(Array.isArray(channels) ? channels : [channels])];
    if (patterns.length === 0 || patterns.some((p) => typeof p !== "string" || !p)) {
      throw new TypeError("odin-client: subscribe needs channels or patterns");
    }
    if (typeof fn !== "function") throw new TypeError("odin-client: subscribe needs a handler");
    /** @type {SubscriptionState} */
    const sub = {
      id: ++this._numbers,
      patterns,
      fn,
      acknowledged: false,
      active: false,
      closed: false,
    };
    this._subs.set(sub.id, sub);
    if (this.connected) this._requestSubscribe([sub], false);
    return {
      channels: [...patterns],
      unsubscribe: () => this._drop(sub, patterns),
    };
  }

  /**
   * Unsubscribe from channels or patterns, for every subscription that holds them.
   * @param {string | string[]} channels
   * @returns {void}
   */
  unsubscribe(channels) {
    const gone = Array.isArray(channels) ? channels : [channels];
    for (const sub of [...this._subs.values()]) this._drop(sub, gone);
  }

  /**
   * Resolves once connected and every current subscription is acknowledged (rejects when
   * the client is closed first).
   * @returns {Promise<void>}
   */
  ready() {
    if (this._isReady()) return Promise.resolve();
    if (this._closed) return Promise.reject(new Error("odin-client: the client is closed"));
    return new Promise((resolve, reject) => {
      this._readyWaiters.push(() => (this._closed ? reject(new Error("odin-client: the client is closed")) : resolve()));
    });
  }

  /**
   * Close for good (code 1000); no reconnect.
   * @returns {void}
   */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._retryTimer);
    const ws = this._ws;
    const wasConnected = this.connected;
    this._teardown();
    if (ws) {
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    if (wasConnected || ws) {
      this._emit("disconnected", { code: 1000, reason: "client closed", willReconnect: false, delay: 0 });
    }
    this._wakeReady();
  }

  // ---- events -----------------------------------------------------------------------------

  /**
   * @private
   * @param {string} name
   * @param {any} info
   */
  _emit(name, info) {
    for (const fn of [...(this._handlers.get(name) ?? [])]) {
      this._call(fn, info, name);
    }
  }

  /**
   * Run a user's function; its exception becomes an "error" event, never reaches the socket.
   * @private
   * @param {Function} fn
   * @param {any} arg
   * @param {string} where
   */
  _call(fn, arg, where) {
    try {
      fn(arg);
    } catch (error) {
      if (where === "error") {
        // an "error" handler that throws: report it where it cannot loop
        setTimeout(() => {
          throw error;
        }, 0);
        return;
      }
      this._emit("error", {
        code: "HANDLER_ERROR",
        message: `a ${where} handler threw: ${/** @type {any} */ (error)?.message ?? error}`,
        error,
      });
    }
  }

  // ---- subscriptions ----------------------------------------------------------------------

  /**
   * @private
   * @param {SubscriptionState} sub
   * @param {string[]} patterns
   */
  _drop(sub, patterns) {
    if (sub.closed) return;
    const before = sub.patterns;
    sub.patterns = before.filter((p) => !patterns.includes(p));
    if (sub.patterns.length === before.length) return;
    const removed = before.filter((p) => !sub.patterns.includes(p));
    if (sub.patterns.length === 0) {
      sub.closed = true;
      this._subs.delete(sub.id);
    }
    const held = new Set([...this._subs.values()].flatMap((s) => s.patterns));
    const gone = removed.filter((p) => !held.has(p));
    if (gone.length && this.connected) {
      this._send({ type: "unsubscribe", data: { channels: gone } });
    }
    this._wakeReady();
  }

  /**
   * @private
   * @param {SubscriptionState[]} subs
   * @param {boolean} recover
   */
  _requestSubscribe(subs, recover) {
    const id = `s${++this._numbers}`;
    const patterns = [...new Set(subs.flatMap((s) => s.patterns))];
    /** @type {any} */
    const data = { channels: patterns };
    if (recover) {
      /** @type {Record<string, Position>} */
      const positions = {};
      for (const [channel, position] of this.positions) {
        if (patterns.some((p) => matches(p, channel))) {
          positions[channel] = { epoch: position.epoch, seq: position.seq };
        }
      }
      if (Object.keys(positions).length) data.recover = positions;
    }
    this._requests.set(id, subs);
    this._send({ type: "subscribe", id, data });
  }

  /** @private */
  _isReady() {
    return this.connected && [...this._subs.values()].every((s) => s.active);
  }

  /** @private */
  _wakeReady() {
    if (!this._isReady() && !this._closed) return;
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const wake of waiters) wake();
  }

  // ---- the connection ---------------------------------------------------------------------

  /** @private */
  async _tokenNow() {
    const source = this._token;
    if (source == null) return null;
    if (typeof source === "string") return source;
    return (await source()) ?? null;
  }

  /** @private */
  async _open() {
    if (this._closed) return;
    /** @type {string | null} */
    let token;
    try {
      token = await this._tokenNow();
    } catch (error) {
      this._emit("error", { code: "TOKEN_PROVIDER", message: `the token provider failed: ${/** @type {any} */ (error)?.message ?? error}`, error });
      this._lost(1006, "no token", null);
      return;
    }
    if (this._closed) return;
    const protocols = [SUBPROTOCOL];
    if (token && this._tokenIn === "subprotocol") protocols.push(`odin.token.${token}`);
    /** @type {any} */
    let ws;
    try {
      ws = new this._WebSocket(this.url, protocols);
    } catch (error) {
      this._emit("error", { code: "CONNECT_FAILED", message: `cannot open ${this.url}: ${/** @type {any} */ (error)?.message ?? error}`, error });
      this._lost(1006, "", null);
      return;
    }
    this._ws = ws;
    this._awaitingPong = false;
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && !this.connected) this._abandon(ws, 4000, "connect timeout");
    }, this._connectTimeout);
    const state = { token, authed: !(token && this._tokenIn === "message"), status: 0 };
    ws.onmessage = (/** @type {any} */ e) => {
      if (this._ws !== ws) return;
      try {
        this._receive(ws, e.data, state);
      } catch (error) {
        this._emit("error", { code: "INVALID_FRAME", message: `cannot handle a frame: ${/** @type {any} */ (error)?.message ?? error}`, error });
      }
    };
    ws.onclose = (/** @type {any} */ e) => {
      if (this._ws !== ws) return;
      if (state.status === 401) this._lost(1006, "401 Unauthorized", ws, true);
      else this._lost(e.code ?? 1006, e.reason ?? "", ws);
    };
    ws.onerror = (/** @type {any} */ e) => {
      // A close event follows. Browsers say nothing of a refused upgrade; the ws package
      // names the HTTP status, so a 401 (a token the server refuses) can be told apart.
      const status = /Unexpected server response: (\d+)/.exec(String(e?.message ?? ""));
      if (status) state.status = Number(status[1]);
    };
  }

  /**
   * Give up a connection at once (no close handshake awaited) and schedule the next.
   * @private
   * @param {any} ws
   * @param {number} code
   * @param {string} reason
   */
  _abandon(ws, code, reason) {
    try {
      // The ws package can drop the socket at once; a browser's close() does not wait either.
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close(4000, reason);
    } catch {
      // closing already
    }
    this._lost(code, reason, ws);
  }

  /**
   * @private
   * @param {any} ws
   * @param {any} frame
   * @param {{token: string | null, authed: boolean}} state
   */
  _receive(ws, frame, state) {
    if (typeof frame !== "string") return; // the protocol is JSON text
    const message = JSON.parse(frame);
    if (message === null || typeof message !== "object") return;
    this._awaitingPong = false;
    this._armHeartbeat(ws);
    if (typeof message.seq === "number" && typeof message.channel === "string") {
      this._onEvent(message);
      return;
    }
    switch (message.type) {
      case "hello":
        this._hello = message;
        if (!state.authed) {
          this._sendOn(ws, { type: "auth", id: "auth", data: { token: state.token } });
        } else {
          this._established(ws, state.token);
        }
        break;
      case "auth_ok":
        if (!state.authed) {
          state.authed = true;
          this._established(ws, null);
        }
        this._emit("token", { sub: message.sub ?? null, expiresAt: message.expires_at ?? null });
        break;
      case "subscription_ack":
        this._onAck(message);
        break;
      case "gap":
        this._onGap(message);
        break;
      case "replay_complete":
      case "replay_incomplete":
        this._onReplayEnd(message);
        break;
      case "error":
        this._onError(message);
        break;
      case "reconnect":
        this._reconnectAfter = Math.max(0, Number(message.after_ms) || 0);
        break;
      case "token_expiring":
        this._refresh(ws);
        break;
      default:
        break; // pong, unsubscription_ack, messages of later versions
    }
  }

  /**
   * @private
   * @param {any} ws
   * @param {string | null} token
   */
  _established(ws, token) {
    clearTimeout(this._connectTimer);
    this.connected = true;
    this.connections += 1;
    this._failures = 0;
    this._refusals = 0;
    this.connectionId = String(this._hello?.connection_id ?? "") || null;
    this._requests.clear();
    this._pending.clear();
    for (const sub of this._subs.values()) sub.active = false;
    // Those acknowledged before resubscribe together, recovering what they missed; those
    // never acknowledged go alone, so one refused cannot take the others down.
    const known = [...this._subs.values()].filter((s) => s.acknowledged);
    if (known.length) this._requestSubscribe(known, true);
    for (const sub of this._subs.values()) {
      if (!sub.acknowledged) this._requestSubscribe([sub], true);
    }
    this._emit("connected", { connectionId: this.connectionId ?? "", hello: this._hello });
    if (token && this._ws === ws) {
      const claims = claimsOf(token);
      if (claims) this._emit("token", claims);
    }
    this._wakeReady();
  }

  /**
   * @private
   * @param {any} ws
   */
  async _refresh(ws) {
    if (typeof this._token !== "function") return; // a static token cannot be renewed
    let token;
    try {
      token = await this._tokenNow();
    } catch (error) {
      this._emit("error", { code: "TOKEN_PROVIDER", message: `the token provider failed: ${/** @type {any} */ (error)?.message ?? error}`, error });
      return;
    }
    if (token && this._ws === ws) this._sendOn(ws, { type: "refresh", id: "refresh", data: { token } });
  }

  /**
   * @private
   * @param {any} message
   */
  _send(message) {
    if (this._ws && this.connected) this._sendOn(this._ws, message);
  }

  /**
   * @private
   * @param {any} ws
   * @param {any} message
   */
  _sendOn(ws, message) {
    try {
      ws.send(JSON.stringify(message));
    } catch (error) {
      this._emit("error", { code: "SEND_FAILED", message: `cannot send ${message.type}: ${/** @type {any} */ (error)?.message ?? error}`, error });
    }
  }

  /**
   * @private
   * @param {any} ws
   */
  _armHeartbeat(ws) {
    clearTimeout(this._beatTimer);
    if (!this._heartbeat || this._ws !== ws) return;
    this._beatTimer = setTimeout(() => {
      if (this._ws !== ws) return;
      if (this._awaitingPong) {
        this._abandon(ws, 4000, "no pong");
        return;
      }
      this._sendOn(ws, { type: "heartbeat" });
      this._armHeartbeat(ws);
      this._awaitingPong = true;
    }, this._heartbeat);
  }

  /** @private */
  _teardown() {
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.onmessage = ws.onclose = ws.onerror = () => {};
    clearTimeout(this._beatTimer);
    clearTimeout(this._connectTimer);
    this.connected = false;
    this.connectionId = null;
    this._requests.clear();
    this._pending.clear();
    for (const sub of this._subs.values()) sub.active = false;
  }

  /**
   * The connection is gone (or never came): decide whether and when to try again.
   * @private
   * @param {number} code
   * @param {string} reason
   * @param {any} ws
   * @param {boolean} [unauthorized] the upgrade was answered 401
   */
  _lost(code, reason, ws, unauthorized = false) {
    if (ws && this._ws !== ws) return;
    const wasConnected = this.connected;
    this._teardown();
    if (this._closed) return;
    // A refusal of the token: the same token cannot help, so a fixed one (or none) gives up
    // at once, a provider after MAX_REFUSALS in a row. 4010 (expired) is no refusal.
    if (code === 4011 || code === 4012 || unauthorized) {
      this._refusals += 1;
      if (typeof this._token !== "function" || this._refusals >= MAX_REFUSALS) {
        this._closed = true;
        const what = typeof this._token === "function" ? `${this._refusals} tokens in a row` : "a fixed token cannot be renewed";
        this._emit("error", {
          code: code === 4011 ? "AUTH_REQUIRED" : "TOKEN_INVALID",
          message: `the server refused the token (${unauthorized ? "401" : code} ${reason}); ${what}: giving up`,
        });
        this._emit("disconnected", { code, reason, willReconnect: false, delay: 0 });
        this._wakeReady();
        return;
      }
    }
    if (!wasConnected) this._failures += 1;
    let delay;
    if (this._reconnectAfter !== null) {
      delay = this._reconnectAfter;
    } else {
      // Exponential with full jitter between minDelay and a ceiling that doubles with each
      // failed attempt (2 x minDelay after a connection that was established), so that
      // clients cut off together do not come back together.
      const ceiling = Math.min(this._maxDelay, this._minDelay * 2 ** Math.min(this._failures + 1, 30));
      delay = Math.round(this._minDelay + Math.random() * Math.max(0, ceiling - this._minDelay));
    }
    this._reconnectAfter = null;
    this._emit("disconnected", { code, reason, willReconnect: !this._closed, delay });
    if (this._closed) return; // a handler closed the client
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  // ---- what the server sends ----------------------------------------------------------------

  /**
   * @private
   * @param {string} channel
   */
  _routes(channel) {
    return [...this._subs.values()].filter(
      (s) => s.active && !s.closed && s.patterns.some((p) => matches(p, channel)),
    );
  }

  /**
   * @private
   * @param {any} message
   */
  _onEvent(message) {
    const channel = message.channel;
    const pending = this._pending.get(channel);
    if (pending && message.seq > pending.to) {
      pending.held.push(message);
      return;
    }
    this._deliver(message);
  }

  /**
   * @private
   * @param {any} message
   */
  _deliver(message) {
    const channel = message.channel;
    const last = this.positions.get(channel);
    if (last && last.epoch === message.epoch) {
      if (message.seq <= last.seq) return; // a duplicate (possible only around a replay)
      if (typeof message.prev === "number" && message.prev > last.seq) {
        const from = last.seq + 1;
        const to = message.prev;
        if (this._replayGaps && this._fetch(channel, from, to, message)) return;
        this._emit("gap", { channel, from, to, reason: "missed" });
      }
    }
    this.positions.set(channel, { epoch: message.epoch, seq: message.seq });
    /** @type {OdinEvent} */
    const event = {
      type: message.type,
      channel,
      seq: message.seq,
      prev: message.prev,
      epoch: message.epoch,
      ts: message.ts,
      data: message.data,
    };
    for (const sub of this._routes(channel)) this._call(sub.fn, event, "subscription");
  }

  /**
   * Ask `replay` for `from`..`to` of `channel`; `held` (if any) waits until it ends.
   * @private
   * @param {string} channel
   * @param {number} from
   * @param {number} to
   * @param {any} held
   * @returns {boolean} whether a replay was asked
   */
  _fetch(channel, from, to, held) {
    if (!this.connected || this._pending.has(channel)) return false;
    const id = `r${++this._numbers}`;
    this._pending.set(channel, { id, from, to, held: held ? [held] : [] });
    this._send({ type: "replay", id, data: { channel, from, to } });
    return true;
  }

  /**
   * @private
   * @param {any} message
   */
  _onReplayEnd(message) {
    const channel = message.channel;
    const pending = this._pending.get(channel);
    if (!pending || pending.id !== message.id) return;
    this._pending.delete(channel);
    if (message.type === "replay_incomplete") {
      for (const range of message.missing ?? []) {
        this._emit("gap", { channel, from: range.from, to: range.to, reason: message.reason ?? "missed" });
        this._advance(channel, range.to);
      }
    }
    // What came meanwhile, in order; a gap among it may start the next replay, behind which
    // the rest waits again.
    for (const held of pending.held) {
      const next = this._pending.get(channel);
      if (next) next.held.push(held);
      else if (held.type === "gap" && typeof held.seq !== "number") this._onGap(held);
      else this._deliver(held);
    }
  }

  /**
   * @private
   * @param {string} channel
   * @param {number} seq
   */
  _advance(channel, seq) {
    const last = this.positions.get(channel);
    if (last && seq > last.seq) this.positions.set(channel, { epoch: last.epoch, seq });
  }

  /**
   * @private
   * @param {any} message
   */
  _onGap(message) {
    const channel = message.channel;
    const from = message.from;
    const to = message.to;
    const reason = message.reason ?? "";
    const replayable = reason !== "invalid_payload" && reason !== "payload_too_large";
    const pending = this._pending.get(channel);
    if (pending) {
      pending.held.push(message); // after the replay in flight
      return;
    }
    const last = this.positions.get(channel);
    if (last && to <= last.seq) return;
    if (this._replayGaps && replayable && last && this._fetch(channel, Math.max(from, last.seq + 1), to, null)) {
      return;
    }
    this._emit("gap", { channel, from, to, reason });
    this._advance(channel, to);
  }

  /**
   * @private
   * @param {any} message
   */
  _onAck(message) {
    const subs = this._requests.get(String(message.id));
    if (!subs) return;
    this._requests.delete(String(message.id));
    const recovery = message.recovery ?? {};
    for (const [channel, report] of Object.entries(recovery)) {
      // Not recovered: the history after our position is gone; the channel's latest event
      // follows the ack and is the new starting point.
      if (/** @type {any} */ (report)?.recovered === false) this.positions.delete(channel);
    }
    for (const [channel, position] of Object.entries(message.positions ?? {})) {
      // Where we have no position of a channel, the ack's is where live delivery starts.
      if (channel in recovery || this.positions.has(channel)) continue;
      const p = /** @type {any} */ (position);
      if (p && typeof p === "object") this.positions.set(channel, { epoch: String(p.epoch), seq: Number(p.seq) });
    }
    for (const sub of subs) {
      if (!sub.closed) sub.active = sub.acknowledged = true;
    }
    for (const [channel, report] of Object.entries(recovery)) {
      const r = /** @type {any} */ (report);
      /** @type {RecoveredInfo} */
      const info = { channel, recovered: r?.recovered !== false, count: Number(r?.count ?? 0) };
      if (r?.reason) info.reason = String(r.reason);
      this._emit("recovered", info);
    }
    this._wakeReady();
  }

  /**
   * @private
   * @param {any} message
   */
  _onError(message) {
    const id = message.id == null ? null : String(message.id);
    const subs = id === null ? undefined : this._requests.get(id);
    if (subs) {
      // A refused subscription (FORBIDDEN, INVALID_CHANNEL, SUBSCRIPTION_LIMIT) ends.
      this._requests.delete(/** @type {string} */ (id));
      for (const sub of subs) {
        sub.closed = true;
        this._subs.delete(sub.id);
      }
    }
    if (id !== null && message.request === "replay") {
      for (const [channel, pending] of this._pending) {
        if (pending.id === id) {
          this._onReplayEnd({ type: "replay_incomplete", channel, id, reason: message.code, missing: [{ from: pending.from, to: pending.to }] });
        }
      }
    }
    this._emit("error", { code: String(message.code ?? ""), message: String(message.message ?? ""), request: message });
    this._wakeReady();
  }
}

/**
 * Connect to the Odin server at `url` (`ws://host:3002/ws`) and stay connected until
 * `close()`.
 * @param {string} url
 * @param {ConnectOptions} [options]
 * @returns {OdinClient}
 */
export function connect(url, options = {}) {
  return new OdinClient(url, options);
}
