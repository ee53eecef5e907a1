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
export function matches(pattern: string, channel: string): boolean;
/**
 * Connect to the Odin server at `url` (`ws://host:3002/ws`) and stay connected until
 * `close()`.
 * @param {string} url
 * @param {ConnectOptions} [options]
 * @returns {OdinClient}
 */
export function connect(url: string, options?: ConnectOptions): OdinClient;
/** The WebSocket subprotocol of protocol v1. */
export const SUBPROTOCOL: "odin.v1";
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
    constructor(url: string, options?: ConnectOptions);
    /** @readonly */
    readonly url: string;
    /** @private */
    private _token;
    /** @private */
    private _tokenIn;
    /** @private */
    private _WebSocket;
    /** @private */
    private _minDelay;
    /** @private */
    private _maxDelay;
    /** @private */
    private _replayGaps;
    /** @private */
    private _heartbeat;
    /** @private */
    private _connectTimeout;
    /**
     * Per channel, the position after the last event delivered (or from the ack).
     * @type {Map<string, Position>}
     */
    positions: Map<string, Position>;
    /** Whether a connection is open and ready (after `hello`). */
    connected: boolean;
    /**
     * The current connection's id (from `hello`); null while offline.
     * @type {string | null}
     */
    connectionId: string | null;
    /** How many connections have been established. */
    connections: number;
    /** @private @type {Map<string, Set<Function>>} */
    private _handlers;
    /** @private @type {Map<number, SubscriptionState>} */
    private _subs;
    /** @private */
    private _numbers;
    /** @private @type {any} */
    private _ws;
    /** @private */
    private _closed;
    /** @private */
    private _failures;
    /** @private */
    private _refusals;
    /** @private @type {number | null} */
    private _reconnectAfter;
    /** @private @type {any} */
    private _retryTimer;
    /** @private @type {any} */
    private _beatTimer;
    /** @private @type {any} */
    private _connectTimer;
    /** @private */
    private _awaitingPong;
    /** @private @type {Map<string, SubscriptionState[]>} */
    private _requests;
    /** @private @type {Map<string, PendingReplay>} */
    private _pending;
    /** @private @type {Array<() => void>} */
    private _readyWaiters;
    /** @private @type {any} */
    private _hello;
    /**
     * Listen to one of the client's events.
     * @template {keyof EventMap} K
     * @param {K} name
     * @param {(info: EventMap[K]) => void} fn
     * @returns {this}
     */
    on<K extends keyof EventMap>(name: K, fn: (info: EventMap[K]) => void): this;
    /**
     * Stop listening.
     * @template {keyof EventMap} K
     * @param {K} name
     * @param {(info: EventMap[K]) => void} fn
     * @returns {this}
     */
    off<K extends keyof EventMap>(name: K, fn: (info: EventMap[K]) => void): this;
    /**
     * Subscribe to channels or patterns (`BTC.trade`, `BTC.*`, `*.trade`); `fn` gets their
     * events in order, once each, across reconnects.
     * @param {string | string[]} channels
     * @param {(event: OdinEvent) => void} fn
     * @returns {Subscription}
     */
    subscribe(channels: string | string[], fn: (event: OdinEvent) => void): Subscription;
    /**
     * Unsubscribe from channels or patterns, for every subscription that holds them.
     * @param {string | string[]} channels
     * @returns {void}
     */
    unsubscribe(channels: string | string[]): void;
    /**
     * Resolves once connected and every current subscription is acknowledged (rejects when
     * the client is closed first).
     * @returns {Promise<void>}
     */
    ready(): Promise<void>;
    /**
     * Close for good (code 1000); no reconnect.
     * @returns {void}
     */
    close(): void;
    /**
     * @private
     * @param {string} name
     * @param {any} info
     */
    private _emit;
    /**
     * Run a user's function; its exception becomes an "error" event, never reaches the socket.
     * @private
     * @param {Function} fn
     * @param {any} arg
     * @param {string} where
     */
    private _call;
    /**
     * @private
     * @param {SubscriptionState} sub
     * @param {string[]} patterns
     */
    private _drop;
    /**
     * @private
     * @param {SubscriptionState[]} subs
     * @param {boolean} recover
     */
    private _requestSubscribe;
    /** @private */
    private _isReady;
    /** @private */
    private _wakeReady;
    /** @private */
    private _tokenNow;
    /** @private */
    private _open;
    /**
     * Give up a connection at once (no close handshake awaited) and schedule the next.
     * @private
     * @param {any} ws
     * @param {number} code
     * @param {string} reason
     */
    private _abandon;
    /**
     * @private
     * @param {any} ws
     * @param {any} frame
     * @param {{token: string | null, authed: boolean}} state
     */
    private _receive;
    /**
     * @private
     * @param {any} ws
     * @param {string | null} token
     */
    private _established;
    /**
     * @private
     * @param {any} ws
     */
    private _refresh;
    /**
     * @private
     * @param {any} message
     */
    private _send;
    /**
     * @private
     * @param {any} ws
     * @param {any} message
     */
    private _sendOn;
    /**
     * @private
     * @param {any} ws
     */
    private _armHeartbeat;
    /** @private */
    private _teardown;
    /**
     * The connection is gone (or never came): decide whether and when to try again.
     * @private
     * @param {number} code
     * @param {string} reason
     * @param {any} ws
     * @param {boolean} [unauthorized] the upgrade was answered 401
     */
    private _lost;
    /**
     * @private
     * @param {string} channel
     */
    private _routes;
    /**
     * @private
     * @param {any} message
     */
    private _onEvent;
    /**
     * @private
     * @param {any} message
     */
    private _deliver;
    /**
     * Ask `replay` for `from`..`to` of `channel`; `held` (if any) waits until it ends.
     * @private
     * @param {string} channel
     * @param {number} from
     * @param {number} to
     * @param {any} held
     * @returns {boolean} whether a replay was asked
     */
    private _fetch;
    /**
     * @private
     * @param {any} message
     */
    private _onReplayEnd;
    /**
     * @private
     * @param {string} channel
     * @param {number} seq
     */
    private _advance;
    /**
     * @private
     * @param {any} message
     */
    private _onGap;
    /**
     * @private
     * @param {any} message
     */
    private _onAck;
    /**
     * @private
     * @param {any} message
     */
    private _onError;
}
/**
 * A position in a channel's history.
 */
export type Position = {
    epoch: string;
    seq: number;
};
/**
 * An event as the server sends it (docs/protocol.md#events).
 */
export type OdinEvent = {
    /**
     * the payload's own `type`, or `<event>:update`
     */
    type: string;
    /**
     * `SYMBOL.event`
     */
    channel: string;
    /**
     * its position in the history
     */
    seq: number;
    /**
     * the position of the channel's previous message (0: none)
     */
    prev: number;
    /**
     * the name of the history the positions belong to
     */
    epoch: string;
    /**
     * when the history stored it, Unix ms
     */
    ts: number;
    /**
     * the publisher's JSON
     */
    data: any;
};
/**
 * A token, or a function that returns one (called on every connect and on `token_expiring`).
 */
export type TokenSource = string | (() => string | null | undefined | Promise<string | null | undefined>);
export type ConnectOptions = {
    /**
     * a JWT, or a function returning one
     */
    token?: TokenSource | undefined;
    /**
     * how the token is sent: in the subprotocol
     * list (`odin.token.<jwt>`, the default: a refused token fails the upgrade with 401, which a
     * browser cannot tell from a network failure) or as the first message (`auth`: a refused
     * token closes with 4012 and its reason)
     */
    tokenIn?: "subprotocol" | "message" | undefined;
    /**
     * the WebSocket constructor; default `globalThis.WebSocket`
     * (in Node 18 and 20 pass the `ws` package's)
     */
    WebSocket?: any;
    /**
     * shortest reconnect backoff, ms (250)
     */
    minDelay?: number | undefined;
    /**
     * longest reconnect backoff, ms (10000)
     */
    maxDelay?: number | undefined;
    /**
     * on a gap, fetch the missed range with `replay` and
     * deliver it in order (false)
     */
    replayGaps?: boolean | undefined;
    /**
     * ms between heartbeats when the socket is quiet; a missing
     * pong within as long again closes and reconnects (25000; 0: none)
     */
    heartbeat?: number | undefined;
    /**
     * ms a connection may take to be ready (hello, and
     * auth_ok with `tokenIn: "message"`) before it is given up and tried again (10000)
     */
    connectTimeout?: number | undefined;
};
export type ConnectedInfo = {
    /**
     * the server's id of this connection
     */
    connectionId: string;
    /**
     * the server's `hello` message
     */
    hello: any;
};
export type DisconnectedInfo = {
    /**
     * the close code (1006: no close frame)
     */
    code: number;
    /**
     * the close reason
     */
    reason: string;
    /**
     * false once the client has stopped for good
     */
    willReconnect: boolean;
    /**
     * ms until the next attempt (0 when not reconnecting)
     */
    delay: number;
};
export type GapInfo = {
    channel: string;
    /**
     * first position that holds a message you will not get
     */
    from: number;
    /**
     * last such position
     */
    to: number;
    /**
     * the server's (`conflated`, ...), `missed` when the client saw
     * an event whose `prev` skips positions, or a replay's reason
     */
    reason: string;
};
export type RecoveredInfo = {
    channel: string;
    /**
     * true: every missed event follows; false: the channel's
     * latest event follows (reload your state from it)
     */
    recovered: boolean;
    /**
     * how many missed events the server replays
     */
    count: number;
    /**
     * why not recovered (`epoch_changed`, `history_expired`, ...)
     */
    reason?: string | undefined;
};
export type ErrorInfo = {
    /**
     * the server's error code, or the client's: `TOKEN_INVALID`,
     * `AUTH_REQUIRED` (the client gave up: the server refused its token), `HANDLER_ERROR` (a
     * handler threw), `TOKEN_PROVIDER` (the token function failed), `INVALID_FRAME`,
     * `CONNECT_FAILED`, `SEND_FAILED`
     */
    code: string;
    message: string;
    /**
     * the exception, for client-side problems
     */
    error?: any;
    /**
     * the server's error message, for server errors
     */
    request?: any;
};
export type TokenInfo = {
    /**
     * the token's subject
     */
    sub: string | null;
    /**
     * its expiry, Unix ms (null: none)
     */
    expiresAt: number | null;
};
export type EventMap = {
    connected: ConnectedInfo;
    disconnected: DisconnectedInfo;
    gap: GapInfo;
    recovered: RecoveredInfo;
    error: ErrorInfo;
    token: TokenInfo;
};
/**
 * What `subscribe` returns.
 */
export type Subscription = {
    /**
     * its channels and patterns
     */
    channels: string[];
    /**
     * stop it (patterns another subscription holds stay
     * subscribed)
     */
    unsubscribe: () => void;
};
export type SubscriptionState = {
    id: number;
    patterns: string[];
    fn: (event: OdinEvent) => void;
    /**
     * the server acknowledged it at least once
     */
    acknowledged: boolean;
    /**
     * acknowledged on the current connection: its events flow
     */
    active: boolean;
    closed: boolean;
};
/**
 * A replay in flight for a gap: events of the channel after `to` wait in `held`.
 */
export type PendingReplay = {
    id: string;
    from: number;
    to: number;
    held: any[];
};
