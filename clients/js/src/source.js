// @ts-check
// One EventSource, with our own reconnect once the browser has given up.
//
// EventSource reconnects by itself (paced by the server's `retry:`) and sends Last-Event-ID.
// Only when it gave up (readyState CLOSED: a 502 during a deploy, a 401) do we open a new one,
// after backoff(), resuming with ?lastEventId=; first `authExpired()` is asked, and a stream
// whose credentials died reports state 'auth' instead of retrying.
//
// With stream tickets the URL is single use: the browser's own reconnect would present a spent
// ticket, so any error closes the EventSource and a new one opens with a fresh ticket (after
// about the server's retry hint, then backing off when that keeps failing).

import { backoff } from './backoff.js';

/** @typedef {import('./wire.js').StreamFrame} StreamFrame */
/** @typedef {'connecting' | 'open' | 'reconnecting' | 'auth'} SourceState */

/**
 * @typedef {object} SourceEnv
 * @property {(key: string, lastEventId: string | null) => Promise<string>} urlFor
 * @property {() => Promise<boolean>} authExpired
 * @property {typeof EventSource} EventSource
 * @property {boolean} withCredentials
 * @property {boolean} singleUseUrls stream tickets: reopen ourselves on every error
 * @property {number} [ticketRetryMs] first delay before a fresh ticket (default 1000)
 * @property {() => number} [random]
 */

export class StreamSource {
  /**
   * @param {string} key
   * @param {object} options
   * @param {string | null} [options.lastEventId]
   * @param {SourceEnv} options.env
   * @param {(key: string, frame: StreamFrame, lastEventId: string | null) => void} options.onFrame
   * @param {(key: string, state: SourceState) => void} options.onState
   */
  constructor(key, { lastEventId = null, env, onFrame, onState }) {
    this.key = key;
    this.lastEventId = lastEventId;
    this.env = env;
    this.onFrame = onFrame;
    this.onState = onState;
    /** @type {SourceState} */
    this.state = 'connecting';
    this.attempt = 0;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.timer = null;
    /** @type {EventSource | null} */
    this.es = null;
    this.closed = false;
    this.openedAt = 0;
  }

  async open() {
    if (this.closed) return;
    let url;
    try {
      url = await this.env.urlFor(this.key, this.lastEventId);
    } catch (error) {
      if (this.closed) return;
      if (error instanceof Error && error.name === 'AuthRequiredError') this.setState('auth');
      else this.retryLater(); // no ticket (network, 5xx): try again later
      return;
    }
    if (this.closed) return;
    const es = new this.env.EventSource(url, { withCredentials: this.env.withCredentials });
    this.es = es;
    es.onopen = () => {
      if (this.es !== es) return;
      this.attempt = 0;
      this.openedAt = Date.now();
      this.setState('open');
    };
    es.onmessage = (event) => {
      if (this.es !== es) return;
      if (event.lastEventId) this.lastEventId = event.lastEventId;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (!frame || typeof frame !== 'object' || typeof frame.type !== 'string') return;
      // A fresh stream starts at the history position named in `connected` (data, not an SSE
      // id): remember it so a drop before the first update still resumes without a gap.
      if (frame.type === 'connected' && !this.lastEventId && frame.lastEventId) {
        this.lastEventId = frame.lastEventId;
      }
      this.onFrame(this.key, frame, this.lastEventId || null);
    };
    es.onerror = () => {
      if (this.es !== es) return;
      this.setState('reconnecting');
      if (this.env.singleUseUrls || es.readyState === 2 /* CLOSED */) void this.giveUpAndRetry(es);
      // else: the browser retries by itself (retry: from the server)
    };
  }

  /** @param {EventSource} es */
  async giveUpAndRetry(es) {
    es.close();
    if (this.es === es) this.es = null;
    if (this.closed) return;
    if (await this.env.authExpired()) {
      if (!this.closed) this.setState('auth');
      return;
    }
    this.retryLater();
  }

  retryLater() {
    if (this.closed || this.timer) return;
    const random = this.env.random || Math.random;
    const attempt = this.attempt++;
    const delay =
      this.env.singleUseUrls && attempt === 0
        ? Math.round((this.env.ticketRetryMs ?? 1000) * (0.5 + random()))
        : backoff(this.env.singleUseUrls ? attempt - 1 : attempt, random);
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.open();
    }, delay);
  }

  /** @param {SourceState} state */
  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.onState(this.key, state);
  }

  close() {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.es) this.es.close();
    this.es = null;
  }
}
