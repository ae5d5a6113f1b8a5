// @ts-check
// Many tabs, one connection. The tabs of a browser elect a leader with the Web Locks API (the
// lock is released when the leader tab closes or stops, so the next waiting tab takes over).
// Only the leader holds EventSources; it relays every frame to the other tabs over a
// BroadcastChannel, and the other tabs tell it which registrations they follow. Frames are
// routed by registration (an update's registrationId, a snapshot's id), not by stream.
//
// When the wanted set changes (a tab opens or closes, a list page turns a page) the leader opens
// the new stream resuming from the last event id seen (ids are global; the server filters the
// replay by the new set) and closes the old one only once the new one is open, so nothing is
// missed; the overlap's duplicates are dropped by (registrationId, seq). However many tabs are
// open, the browser holds one stream, two while switching over. Without Web Locks (an insecure
// context) or with shareAcrossTabs off, each tab holds its own streams.
//
// Life cycle: the coordinator starts with its first subscription and stops (streams closed,
// lock released, timers cleared, channel closed) a microtask after its last one leaves, so a
// React StrictMode unmount/mount pair keeps it, and an unmounted app leaks nothing.

import { idsOfStreamKey, planStreams } from './plan.js';
import { coverageOf } from './coverage.js';
import { laterId, positionOf } from './event-ids.js';
import { RecentUpdates } from './sequence.js';
import { StreamSource } from './source.js';
import { streamUrl } from './http.js';
import { MAX_IDS_PER_STREAM } from './limits.js';

/** @typedef {import('./wire.js').StreamFrame} StreamFrame */
/** @typedef {import('./wire.js').RegistrationUpdate} RegistrationUpdate */
/** @typedef {import('./http.js').ClientConfig} ClientConfig */
/** @typedef {import('./http.js').Me} Me */
/** @typedef {import('./coverage.js').Coverage} Coverage */

/**
 * What the coordinator needs from a subscription.
 * @typedef {object} Member
 * @property {() => string[]} keys
 * @property {(registrationId: number) => boolean} follows
 * @property {(frame: StreamFrame, ids: number[] | null) => void} receive
 * @property {(coverage: Coverage) => void} setCoverage
 * @property {(reason: string) => void} authRequired
 * @property {number} switchingUntil
 */

const CHANNEL_NAME = 'regstream-stream';
const LOCK_NAME = 'regstream-stream';
const HEARTBEAT_MS = 20000;
const STALE_NEED_MS = 5 * 60000; // timers of hidden tabs may run once a minute
const RECONCILE_MS = 30;

/** @type {Set<(update: RegistrationUpdate) => void>} */
export const finalListeners = new Set();

export class Coordinator {
  /** @param {() => ClientConfig} getConfig */
  constructor(getConfig) {
    this.getConfig = getConfig;
    this.tabId = Math.random().toString(36).slice(2) + Date.now().toString(36);
    /** @type {Set<Member>} */
    this.subs = new Set();
    /** @type {'none' | 'leader' | 'follower'} */
    this.role = 'none';
    this.started = false;
    /** @type {Map<string, StreamSource>} leader only: stream key → source */
    this.sources = new Map();
    /** @type {Map<string, {keys: Set<string>, seen: number}>} leader only: tabId → its keys */
    this.needs = new Map();
    /** @type {Record<string, string>} stream key → 'open' | 'connecting' | 'reconnecting' */
    this.states = {};
    /** @type {string | null} the latest history position seen on any stream */
    this.lastId = null;
    /** @type {Me | null | undefined} undefined: not known yet; null: no sign-in on the server */
    this.me = undefined;
    /** @type {string[]} registration keys no stream carries (polled) */
    this.unserved = [];
    this.recent = new RecentUpdates();
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.reconcileTimer = null;
    /** @type {ReturnType<typeof setInterval> | null} */
    this.heartbeat = null;
    /** @type {BroadcastChannel | null} */
    this.channel = null;
    /** @type {AbortController | null} */
    this.lockAbort = null;
    /** @type {(() => void) | null} */
    this.releaseLock = null;
    this.generation = 1;
  }

  /** Forget everything of the last session (stop()); the same fields as the constructor's. */
  reset() {
    this.sources = new Map();
    this.needs = new Map();
    this.states = {};
    this.lastId = null;
    this.me = undefined;
    this.unserved = [];
    this.recent = new RecentUpdates();
    this.reconcileTimer = null;
    this.heartbeat = null;
    this.channel = null;
    this.lockAbort = null;
    this.releaseLock = null;
    this.generation += 1;
  }

  get shared() {
    return (
      this.getConfig().shareAcrossTabs &&
      typeof BroadcastChannel === 'function' &&
      typeof navigator !== 'undefined' &&
      !!(navigator.locks && navigator.locks.request)
    );
  }

  /** @param {Member} sub */
  add(sub) {
    this.subs.add(sub);
    this.start();
    this.needsChanged();
    sub.setCoverage(this.covers(sub));
  }

  /** @param {Member} sub */
  remove(sub) {
    this.subs.delete(sub);
    this.needsChanged();
    if (this.subs.size === 0) {
      queueMicrotask(() => {
        if (this.subs.size === 0) this.stop();
      });
    }
  }

  localKeys() {
    /** @type {Set<string>} */
    const keys = new Set();
    for (const sub of this.subs) for (const key of sub.keys()) keys.add(key);
    return [...keys];
  }

  start() {
    if (this.started) return;
    this.started = true;
    const generation = this.generation;
    const config = this.getConfig();
    config
      .whoAmI()
      .then((me) => {
        if (this.generation !== generation) return;
        this.me = me;
        if (this.role === 'leader') this.scheduleReconcile();
      })
      .catch((error) => {
        if (this.generation === generation) this.authRequired(error && error.reason ? error.reason : 'expired');
      });
    if (typeof window !== 'undefined') {
      window.addEventListener('pagehide', this.onPageHide);
      window.addEventListener('pageshow', this.onPageShow);
    }
    if (!this.shared) {
      this.becomeLeader();
      return;
    }
    const channel = new BroadcastChannel(CHANNEL_NAME);
    this.channel = channel;
    channel.onmessage = (event) => this.onMessage(event.data);
    this.setRole('follower');
    const abort = new AbortController();
    this.lockAbort = abort;
    navigator.locks
      .request(LOCK_NAME, { signal: abort.signal }, () => {
        if (this.generation !== generation) return undefined;
        this.becomeLeader();
        // held until this tab goes away or stops; then the next tab leads
        return new Promise((resolve) => {
          this.releaseLock = () => resolve(undefined);
        });
      })
      .catch(() => {}); // aborted: stopped while waiting
    this.heartbeat = setInterval(() => {
      if (this.role === 'follower') this.post({ kind: 'need', tabId: this.tabId, keys: this.localKeys() });
      else if (this.role === 'leader') this.pruneNeeds();
    }, HEARTBEAT_MS);
  }

  /** Close everything this tab holds; the next add() starts again. */
  stop() {
    if (!this.started) return;
    this.leave();
    for (const source of this.sources.values()) source.close();
    if (this.reconcileTimer) clearTimeout(this.reconcileTimer);
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.lockAbort) this.lockAbort.abort();
    if (this.releaseLock) this.releaseLock();
    if (this.channel) this.channel.close();
    if (typeof window !== 'undefined') {
      window.removeEventListener('pagehide', this.onPageHide);
      window.removeEventListener('pageshow', this.onPageShow);
    }
    this.reset();
    this.setRole('none');
    this.started = false;
  }

  onPageHide = () => this.leave();

  /** Back from the back/forward cache: our streams and needs were given up in leave(). @param {PageTransitionEvent} event */
  onPageShow = (event) => {
    if (event.persisted && this.started) {
      const subs = [...this.subs];
      this.stop();
      for (const sub of subs) this.add(sub);
    }
  };

  /** @param {'none' | 'leader' | 'follower'} role */
  setRole(role) {
    this.role = role;
    if (typeof document !== 'undefined') document.documentElement.dataset.streamRole = role;
  }

  /** @param {object} message */
  post(message) {
    if (this.channel) this.channel.postMessage(message);
  }

  becomeLeader() {
    this.setRole('leader');
    this.states = {};
    this.post({ kind: 'leader', tabId: this.tabId });
    this.reconcile();
  }

  leave() {
    if (this.role === 'leader') {
      this.post({ kind: 'leader-gone', tabId: this.tabId });
      for (const source of this.sources.values()) source.close();
      this.sources.clear();
    } else if (this.role === 'follower') {
      this.post({ kind: 'bye', tabId: this.tabId });
    }
  }

  /** @param {any} message */
  onMessage(message) {
    if (!message || typeof message !== 'object') return;
    switch (message.kind) {
      case 'need':
        if (this.role !== 'leader') return;
        this.needs.set(message.tabId, { keys: new Set(message.keys || []), seen: Date.now() });
        this.scheduleReconcile();
        this.broadcastStates();
        return;
      case 'bye':
        if (this.role !== 'leader') return;
        this.needs.delete(message.tabId);
        this.scheduleReconcile();
        return;
      case 'leader':
        if (this.role === 'follower') this.post({ kind: 'need', tabId: this.tabId, keys: this.localKeys() });
        return;
      case 'leader-gone':
        if (this.role === 'follower') this.setStates({}, []);
        return;
      case 'states':
        if (this.role === 'follower') this.setStates(message.states || {}, message.unserved || []);
        return;
      case 'frame':
        if (this.role === 'follower') this.dispatch(message.key, message.frame, message.id);
        return;
      case 'auth':
        this.authRequired(message.reason || 'expired', false);
        return;
      default:
    }
  }

  needsChanged() {
    if (this.role === 'leader') this.scheduleReconcile();
    else if (this.role === 'follower') this.post({ kind: 'need', tabId: this.tabId, keys: this.localKeys() });
  }

  pruneNeeds() {
    const now = Date.now();
    for (const [tabId, need] of this.needs) {
      if (now - need.seen > STALE_NEED_MS) this.needs.delete(tabId);
    }
    this.scheduleReconcile();
  }

  /** [stream keys to hold, registration keys to poll]. */
  plan() {
    /** @type {Set<string>} */
    const keys = new Set(this.localKeys());
    for (const need of this.needs.values()) for (const key of need.keys) keys.add(key);
    const me = this.me;
    return planStreams({
      keys,
      unfilteredAllowed: me === null || (!!me && me.role === 'admin'),
      signedIn: me !== null,
      maxIds: MAX_IDS_PER_STREAM,
      singleOnly: this.getConfig().tickets,
    });
  }

  scheduleReconcile() {
    if (this.reconcileTimer) return;
    this.reconcileTimer = setTimeout(() => {
      this.reconcileTimer = null;
      this.reconcile();
    }, RECONCILE_MS);
  }

  /** Leader: open the streams wanted; close the others once the wanted ones are open. */
  reconcile() {
    if (this.role !== 'leader' || this.me === undefined) return;
    const { streams: wanted, unserved } = this.plan();
    this.unserved = unserved;
    const config = this.getConfig();
    for (const key of wanted) {
      if (this.sources.has(key)) continue;
      // Resume where the streams held so far are (ids are global; the server filters the replay
      // by this stream's registrations), so a switch-over or a new leader misses nothing.
      const source = new StreamSource(key, {
        lastEventId: this.resumePosition(),
        env: {
          urlFor: (k, lastEventId) => streamUrl(config, k, lastEventId),
          authExpired: () => config.authExpired(),
          EventSource: config.EventSource || EventSource,
          withCredentials: !!config.baseUrl && !config.tickets,
          singleUseUrls: config.tickets,
        },
        onFrame: (k, frame, id) => this.onSourceFrame(k, frame, id),
        onState: (k, state) => this.onSourceState(k, state),
      });
      this.sources.set(key, source);
      this.states[key] = 'connecting';
      void source.open();
    }
    // Until every wanted stream is open, keep the newest open stream it replaces.
    const ready = wanted.every((key) => this.sources.get(key)?.state === 'open');
    /** @type {StreamSource | null} */
    let keep = null;
    if (!ready) {
      for (const [key, source] of this.sources) {
        if (wanted.includes(key) || source.state !== 'open') continue;
        if (!keep || source.openedAt > keep.openedAt) keep = source;
      }
    }
    for (const [key, source] of this.sources) {
      if (wanted.includes(key) || source === keep) continue;
      source.close();
      this.sources.delete(key);
      delete this.states[key];
    }
    this.broadcastStates();
    this.refreshCoverage();
  }

  /** Where a new stream starts: the latest position seen, best of the open streams. */
  resumePosition() {
    let position = this.lastId;
    for (const source of this.sources.values()) position = laterId(position, positionOf(source.lastEventId));
    return position || null;
  }

  /** @param {string} key @param {StreamFrame} frame @param {string | null} id */
  onSourceFrame(key, frame, id) {
    if (id) this.lastId = laterId(this.lastId, positionOf(id));
    if (frame.type === 'update') {
      const update = frame.data;
      if (!update || typeof update !== 'object') return;
      if (typeof update.registrationId === 'number' && typeof update.seq === 'number') {
        if (this.recent.isRepeat(update.registrationId, update.seq)) return;
      }
      const onLatency = this.getConfig().onLatency;
      if (onLatency && typeof update.timestamp === 'number') onLatency(Date.now() - update.timestamp);
    }
    if (frame.type === 'auth') {
      this.authRequired(frame.reason || 'expired');
      return;
    }
    this.post({ kind: 'frame', key, frame, id });
    this.dispatch(key, frame, id);
    if (frame.type === 'update' && frame.data.final) {
      for (const callback of finalListeners) callback(frame.data);
    }
  }

  /** @param {string} key @param {import('./source.js').SourceState} state */
  onSourceState(key, state) {
    if (state === 'auth') {
      this.authRequired('expired');
      return;
    }
    if (!this.sources.has(key)) return;
    this.states[key] = state;
    if (state === 'open') this.scheduleReconcile();
    this.broadcastStates();
    this.refreshCoverage();
  }

  /** The credentials are gone: every tab is told once; subscriptions get an error. @param {string} reason */
  authRequired(reason, tellOthers = true) {
    if (tellOthers) this.post({ kind: 'auth', reason });
    for (const source of this.sources.values()) source.close();
    this.sources.clear();
    this.states = {};
    for (const sub of [...this.subs]) sub.authRequired(reason);
    this.getConfig().onAuthRequired(reason);
  }

  broadcastStates() {
    if (this.role === 'leader') this.post({ kind: 'states', states: { ...this.states }, unserved: [...this.unserved] });
  }

  /** @param {Record<string, string>} states @param {string[]} unserved */
  setStates(states, unserved) {
    this.states = states;
    this.unserved = unserved;
    this.refreshCoverage();
  }

  /** A subscription's coverage. @param {Member} sub @returns {Coverage} */
  covers(sub) {
    return coverageOf({ states: this.states, unserved: this.unserved }, sub.keys(), sub.switchingUntil);
  }

  refreshCoverage() {
    for (const sub of this.subs) sub.setCoverage(this.covers(sub));
  }

  /** Hand a frame to the subscriptions following its registration(s). @param {string} key @param {StreamFrame} frame @param {string | null} id */
  dispatch(key, frame, id) {
    if (id) this.lastId = laterId(this.lastId, positionOf(id));
    /** @type {number[] | null} null: every subscription */
    let ids = null;
    if (frame.type === 'update' && frame.data && typeof frame.data.registrationId === 'number') {
      ids = [frame.data.registrationId];
    } else if (frame.type === 'snapshot') {
      const data = frame.data;
      if (frame.resync) {
        const listed = data && 'registrationIds' in data && Array.isArray(data.registrationIds) ? data.registrationIds : null;
        const carried = idsOfStreamKey(key);
        ids = listed || (carried ? [...carried].map(Number) : null);
      } else if (data && 'id' in data && typeof data.id === 'number') {
        ids = [data.id];
      }
    } else {
      return; // connected, ping: nothing for subscriptions (auth is handled above)
    }
    for (const sub of [...this.subs]) {
      if (ids === null || ids.some((rid) => sub.follows(rid))) sub.receive(frame, ids);
    }
  }
}
