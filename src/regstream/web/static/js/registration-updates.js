// registration-updates.js: the seed's useRegistrationUpdates hook as a plain ES module, used by
// every page.
//
//   import { createRegistrationUpdates } from '/static/js/registration-updates.js';
//   const updates = createRegistrationUpdates({
//     registrationId: 42,            // or null: every registration
//     onUpdate(update) {}, onSnapshot(snapshot) {}, onConnected() {}, onError(error) {},
//     onStateChange(state) {},       // 'connecting' | 'live' | 'reconnecting' | 'closed'
//     autoConnect: true,
//   });
//   updates.isConnected; updates.latestUpdate; updates.close();
//
// Frames (api/stream.py): connected, update (with an SSE id), ping, snapshot ({data} = the
// registration with processLog and seq; {resync: true[, data.registrationIds]} = re-read from the
// API), auth (credentials expired).
//
// Many tabs, one stream. The tabs of a browser elect a leader with the Web Locks API (the lock
// is released when the leader tab closes, so the next waiting tab takes over). Only the leader
// holds EventSources; it relays every frame to the other tabs over a BroadcastChannel, and the
// other tabs tell it which registrations they follow. The leader opens one stream per distinct
// filter, up to MAX_FILTERED_STREAMS. The unfiltered stream is for admins (api/auth.py): for an
// admin the leader opens that one stream instead of any filtered ones. A filter the leader
// cannot serve (a non-admin following every registration, or more registrations than the cap)
// is polled from the API instead, and its state reads 'polling', never 'live'. However many tabs
// are open, the browser holds at most MAX_FILTERED_STREAMS + 1 streams (the +1 only while
// switching over), below HTTP/1.1's six connections per host with room for page loads. Without
// Web Locks (an insecure context) each tab holds its own streams.
//
// Reconnects: EventSource reconnects by itself, paced by the server's retry:, and sends
// Last-Event-ID. Only when it gave up (readyState CLOSED: a 502 during a deploy, a 401) do we open
// a new one, after 5 s, then exponentially longer with jitter, resuming with ?lastEventId=. First
// we ask /api/auth/me: a 401 means the sign-in expired, and we send the person to /login rather
// than show stale data.
//
// Gaps: each registration's updates carry seq 1, 2, 3 ... A subscription that sees a seq jump
// re-reads that registration from the API and hands it over as a snapshot. A filtered
// subscription also re-reads its registration whenever the stream (re)connects, which closes the
// window between a page's first fetch and the stream being open.
//
// Latency: the leader reports now - update.timestamp (ms) in batches, at most every 5 s.

import { api, goToLogin, signInExpired, getMe } from './session.js';

export const STREAM_PATH = '/api/registrations/updates/stream';
const CHANNEL_NAME = 'regstream-stream';
const LOCK_NAME = 'regstream-stream';
export const MAX_FILTERED_STREAMS = 2;
const POLL_MS = 3000;
const FIRST_RETRY_MS = 5000;
const MAX_RETRY_MS = 60000;
const HEARTBEAT_MS = 20000;
const STALE_NEED_MS = 5 * 60000; // timers of hidden tabs may run once a minute
const LATENCY_FLUSH_MS = 5000;
const LATENCY_MAX_BATCH = 200;
const ALL = '*';

const keyOf = (registrationId) => (registrationId == null ? ALL : String(registrationId));

function backoff(attempt) {
  const base = Math.min(MAX_RETRY_MS, FIRST_RETRY_MS * 2 ** attempt);
  return Math.round(base * (0.8 + Math.random() * 0.4)); // ±20 % jitter
}

// --- one EventSource, with our own reconnect once the browser has given up --------------------

class StreamSource {
  constructor(key, { lastEventId = null, onFrame, onState }) {
    this.key = key;
    this.lastEventId = lastEventId;
    this.onFrame = onFrame;
    this.onState = onState;
    this.state = 'connecting';
    this.attempt = 0;
    this.timer = null;
    this.es = null;
    this.closed = false;
  }

  url() {
    const params = new URLSearchParams();
    if (this.key !== ALL) params.set('registrationId', this.key);
    if (this.lastEventId) params.set('lastEventId', this.lastEventId);
    const query = params.toString();
    return query ? `${STREAM_PATH}?${query}` : STREAM_PATH;
  }

  open() {
    if (this.closed) return;
    const es = new EventSource(this.url(), { withCredentials: true });
    this.es = es;
    es.onopen = () => {
      if (this.es !== es) return;
      this.attempt = 0;
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
      // A fresh stream starts at the history position named in `connected` (data, not an SSE
      // id): remember it so a drop before the first update still resumes without a gap.
      if (frame && frame.type === 'connected' && !this.lastEventId && frame.lastEventId) {
        this.lastEventId = frame.lastEventId;
      }
      if (frame && typeof frame === 'object') this.onFrame(this.key, frame, this.lastEventId || null);
    };
    es.onerror = () => {
      if (this.es !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        this.setState('reconnecting');
        this.giveUpAndRetry(es);
      } else {
        this.setState('reconnecting'); // the browser retries by itself (retry: from the server)
      }
    };
  }

  async giveUpAndRetry(es) {
    es.close();
    if (this.closed) return;
    if (await signInExpired()) {
      this.onState(this.key, 'auth');
      return;
    }
    if (this.closed || this.timer) return;
    const delay = backoff(this.attempt++);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.open();
    }, delay);
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.onState(this.key, state);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = null;
    if (this.es) this.es.close();
    this.es = null;
  }
}

// --- the per-tab coordinator: leader election, relay, stream set -----------------------------

class Coordinator {
  constructor() {
    this.tabId = Math.random().toString(36).slice(2) + Date.now().toString(36);
    this.subs = new Set();
    this.role = 'none';
    this.sources = new Map(); // leader only: key → StreamSource
    this.needs = new Map(); // leader only: tabId → {keys: Set, seen}
    this.states = {}; // key → 'open' | 'connecting' | 'reconnecting'
    this.lastIds = {}; // key → last event id seen (for a new leader to resume from)
    this.me = undefined; // undefined: not known yet; null: sign-in is not enabled (open API)
    this.unserved = [];
    this.finalsSeen = new Set(); // overlapping streams deliver a final twice
    this.samples = [];
    this.latencyTimer = null;
    this.reconcileTimer = null;
    this.started = false;
    this.channel = null;
  }

  get shared() {
    return typeof BroadcastChannel === 'function' && !!(navigator.locks && navigator.locks.request);
  }

  add(sub) {
    this.subs.add(sub);
    this.start();
    this.needsChanged();
    sub.setCoverage(this.covers(sub.key));
  }

  remove(sub) {
    this.subs.delete(sub);
    this.needsChanged();
  }

  localKeys() {
    return [...new Set([...this.subs].map((sub) => sub.key))];
  }

  start() {
    if (this.started) return;
    this.started = true;
    getMe()
      .then((me) => {
        this.me = me;
        if (this.role === 'leader') this.scheduleReconcile();
      })
      .catch(() => {}); // SignInRequired: on the way to /login
    window.addEventListener('pagehide', () => this.leave());
    // Back from the back/forward cache: our streams and needs were given up in leave().
    window.addEventListener('pageshow', (event) => {
      if (event.persisted) location.reload();
    });
    if (!this.shared) {
      this.becomeLeader();
      return;
    }
    this.channel = new BroadcastChannel(CHANNEL_NAME);
    this.channel.onmessage = (event) => this.onMessage(event.data);
    this.setRole('follower');
    navigator.locks.request(LOCK_NAME, () => {
      this.becomeLeader();
      return new Promise(() => {}); // held until this tab goes away; then the next tab leads
    });
    setInterval(() => {
      if (this.role === 'follower') this.post({ kind: 'need', tabId: this.tabId, keys: this.localKeys() });
      else if (this.role === 'leader') this.pruneNeeds();
    }, HEARTBEAT_MS);
  }

  setRole(role) {
    this.role = role;
    document.documentElement.dataset.streamRole = role;
  }

  post(message) {
    if (this.channel) this.channel.postMessage(message);
  }

  becomeLeader() {
    this.setRole('leader');
    this.states = {};
    this.post({ kind: 'leader', tabId: this.tabId });
    this.reconcile();
    this.latencyTimer = setInterval(() => this.flushLatency(), LATENCY_FLUSH_MS);
  }

  leave() {
    if (this.role === 'leader') {
      this.post({ kind: 'leader-gone', tabId: this.tabId });
      for (const source of this.sources.values()) source.close();
      this.sources.clear();
      this.flushLatency(true);
    } else {
      this.post({ kind: 'bye', tabId: this.tabId });
    }
  }

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
        if (this.role === 'follower') {
          this.post({ kind: 'need', tabId: this.tabId, keys: this.localKeys() });
        }
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
        goToLogin();
        return;
      default:
    }
  }

  needsChanged() {
    if (this.role === 'leader') this.scheduleReconcile();
    else if (this.role === 'follower') {
      this.post({ kind: 'need', tabId: this.tabId, keys: this.localKeys() });
    }
  }

  pruneNeeds() {
    const now = Date.now();
    for (const [tabId, need] of this.needs) {
      if (now - need.seen > STALE_NEED_MS) this.needs.delete(tabId);
    }
    this.scheduleReconcile();
  }

  /** [streams to hold, keys to poll]. */
  plan() {
    const keys = new Set(this.localKeys());
    for (const need of this.needs.values()) for (const key of need.keys) keys.add(key);
    if (keys.size === 0) return [[], []];
    const unfilteredAllowed = this.me === null || this.me.role === 'admin';
    if (unfilteredAllowed && (keys.has(ALL) || this.me !== null || keys.size > MAX_FILTERED_STREAMS)) {
      return [[ALL], []];
    }
    // Keep the streams already open first, so a new tab never takes one away from an old tab.
    const filtered = [...keys].filter((k) => k !== ALL);
    filtered.sort((a, b) => Number(this.sources.has(b)) - Number(this.sources.has(a)));
    const held = filtered.slice(0, MAX_FILTERED_STREAMS);
    return [held, [...keys].filter((k) => !held.includes(k))];
  }

  scheduleReconcile() {
    if (this.reconcileTimer) return;
    this.reconcileTimer = setTimeout(() => {
      this.reconcileTimer = null;
      this.reconcile();
    }, 30);
  }

  /** Leader: open the streams wanted, close the ones no longer wanted once covered. */
  reconcile() {
    if (this.role !== 'leader' || this.me === undefined) return;
    const [wanted, unserved] = this.plan();
    this.unserved = unserved;
    for (const key of wanted) {
      if (this.sources.has(key)) continue;
      const source = new StreamSource(key, {
        lastEventId: this.lastIds[key] || null,
        onFrame: (k, frame, id) => this.onSourceFrame(k, frame, id),
        onState: (k, state) => this.onSourceState(k, state),
      });
      this.sources.set(key, source);
      this.states[key] = 'connecting';
      source.open();
    }
    const allOpen = this.sources.get(ALL)?.state === 'open';
    for (const [key, source] of this.sources) {
      if (wanted.includes(key)) continue;
      // Keep an old stream until the one replacing it is open, so nothing is missed meanwhile.
      const replaced = key !== ALL && wanted.includes(ALL) && !allOpen;
      if (replaced) continue;
      source.close();
      this.sources.delete(key);
      delete this.states[key];
    }
    this.broadcastStates();
    this.refreshCoverage();
  }

  onSourceFrame(key, frame, id) {
    if (id) this.lastIds[key] = id;
    if (frame.type === 'update' && frame.data && typeof frame.data.timestamp === 'number') {
      if (this.samples.length < LATENCY_MAX_BATCH * 5) this.samples.push(Date.now() - frame.data.timestamp);
    }
    if (frame.type === 'auth') {
      this.post({ kind: 'auth' });
      goToLogin();
      return;
    }
    this.post({ kind: 'frame', key, frame, id });
    this.dispatch(key, frame, id);
    if (frame.type === 'update' && frame.data && frame.data.final) {
      const seen = `${frame.data.registrationId}:${frame.data.seq}`;
      if (!this.finalsSeen.has(seen)) {
        this.finalsSeen.add(seen);
        if (this.finalsSeen.size > 1000) this.finalsSeen.clear();
        for (const callback of finalListeners) callback(frame.data);
      }
    }
  }

  onSourceState(key, state) {
    if (state === 'auth') {
      this.post({ kind: 'auth' });
      goToLogin();
      return;
    }
    if (!this.sources.has(key)) return;
    this.states[key] = state;
    if (state === 'open') this.scheduleReconcile();
    this.broadcastStates();
    this.refreshCoverage();
  }

  broadcastStates() {
    if (this.role === 'leader') {
      this.post({ kind: 'states', states: { ...this.states }, unserved: [...this.unserved] });
    }
  }

  setStates(states, unserved) {
    this.states = states;
    this.unserved = unserved;
    this.refreshCoverage();
  }

  /** 'live' (a stream carries this key), 'polling' (the leader cannot serve it) or 'down'. */
  covers(key) {
    if (this.states[ALL] === 'open' || (key !== ALL && this.states[key] === 'open')) return 'live';
    if (this.unserved.includes(key)) return 'polling';
    return 'down';
  }

  refreshCoverage() {
    for (const sub of this.subs) sub.setCoverage(this.covers(sub.key));
  }

  dispatch(key, frame, id) {
    if (id) this.lastIds[key] = id;
    for (const sub of [...this.subs]) sub.receive(frame);
  }

  flushLatency(beacon = false) {
    if (this.samples.length === 0) return;
    const batch = this.samples.splice(0, LATENCY_MAX_BATCH).map((ms) => Math.max(0, ms));
    if (beacon) {
      // The page is going away: a keepalive fetch outlives it (sendBeacon cannot send the CSRF
      // header the session cookie needs).
      const headers = { 'Content-Type': 'application/json' };
      if (this.me && this.me.csrfToken) headers['X-CSRF-Token'] = this.me.csrfToken;
      fetch('/api/metrics/latency', {
        method: 'POST', headers, body: JSON.stringify({ samples: batch }), keepalive: true, credentials: 'same-origin',
      }).catch(() => {});
      return;
    }
    api('/api/metrics/latency', { method: 'POST', body: { samples: batch } }).catch(() => {});
  }
}

const finalListeners = new Set();

/**
 * Call ``callback(update)`` for every final update, in exactly one tab of this browser (the
 * leader, which holds the streams): for notifications that must not pop up once per tab.
 */
export function onFinalUpdate(callback) {
  finalListeners.add(callback);
  return () => finalListeners.delete(callback);
}

let coordinator = null;
function getCoordinator() {
  if (!coordinator) coordinator = new Coordinator();
  return coordinator;
}

/** Debug view for tests and the console: this tab's role and the streams it holds. */
window.__regstream = {
  get role() {
    return coordinator ? coordinator.role : 'none';
  },
  get streams() {
    return coordinator ? [...coordinator.sources.keys()] : [];
  },
  get states() {
    return coordinator ? { ...coordinator.states } : {};
  },
};

// --- the public object --------------------------------------------------------------------------

export class RegistrationUpdates {
  constructor({
    registrationId = null,
    onUpdate = () => {},
    onSnapshot = () => {},
    onConnected = () => {},
    onError = () => {},
    onStateChange = () => {},
    autoConnect = true,
    resyncOnGap = true,
  } = {}) {
    this.registrationId = registrationId == null ? null : Number(registrationId);
    this.key = keyOf(this.registrationId);
    this.callbacks = { onUpdate, onSnapshot, onConnected, onError, onStateChange };
    this.resyncOnGap = resyncOnGap;
    this.latestUpdate = null;
    this.state = 'closed';
    this.seqs = new Map(); // registrationId → last seq applied
    this.resyncing = new Set();
    this.pollTimer = null;
    if (autoConnect) this.connect();
  }

  get isConnected() {
    return this.state === 'live';
  }

  /** Tell the module what the page already shows (a seq read from the API). */
  setSeq(registrationId, seq) {
    const current = this.seqs.get(registrationId);
    if (typeof seq === 'number' && (current === undefined || seq > current)) this.seqs.set(registrationId, seq);
  }

  connect() {
    if (this.state !== 'closed') return;
    this.setState('connecting');
    getCoordinator().add(this);
  }

  close() {
    if (this.state === 'closed') return;
    getCoordinator().remove(this);
    this.setState('closed');
  }

  setState(state) {
    if (this.state === state) return;
    const previous = this.state;
    this.state = state;
    clearInterval(this.pollTimer);
    this.pollTimer = null;
    if (state === 'polling') {
      this.pollTimer = setInterval(() => this.poll(), POLL_MS);
      this.poll();
    }
    this.callbacks.onStateChange(state);
    if (state === 'live') {
      this.callbacks.onConnected();
      if (this.registrationId != null) this.resync(this.registrationId, { onlyIfNewer: true });
    } else if (state === 'reconnecting' && previous === 'live') {
      this.callbacks.onError(new Error('stream connection lost; reconnecting'));
    }
  }

  setCoverage(coverage) {
    if (this.state === 'closed') return;
    if (coverage === 'live' || coverage === 'polling') this.setState(coverage);
    else if (this.state === 'live' || this.state === 'polling') this.setState('reconnecting');
  }

  /** No stream for this filter: read the API instead (state 'polling'). */
  poll() {
    if (document.hidden) return;
    if (this.registrationId != null) this.resync(this.registrationId, { onlyIfNewer: true });
    else this.callbacks.onSnapshot({ resync: true, registrationIds: null, polling: true });
  }

  receive(frame) {
    if (this.state === 'closed') return;
    switch (frame.type) {
      case 'update':
        this.receiveUpdate(frame.data);
        return;
      case 'snapshot':
        this.receiveSnapshot(frame);
        return;
      case 'auth':
        goToLogin();
        return;
      default:
    }
  }

  receiveUpdate(update) {
    if (!update || typeof update !== 'object') return;
    const rid = update.registrationId;
    if (this.registrationId != null && rid !== this.registrationId) return;
    if (typeof update.seq === 'number' && typeof rid === 'number') {
      const known = this.seqs.get(rid);
      if (known !== undefined && update.seq <= known) return; // already applied (replay, overlap)
      this.seqs.set(rid, update.seq);
      if (known !== undefined && update.seq > known + 1 && this.resyncOnGap) {
        this.resync(rid, { onlyIfNewer: false });
      }
    }
    this.latestUpdate = update;
    this.callbacks.onUpdate(update);
  }

  receiveSnapshot(frame) {
    if (frame.resync) {
      const ids = frame.data && Array.isArray(frame.data.registrationIds) ? frame.data.registrationIds : null;
      if (this.registrationId != null) {
        if (!ids || ids.includes(this.registrationId)) this.resync(this.registrationId, { onlyIfNewer: false });
        return;
      }
      this.callbacks.onSnapshot({ resync: true, registrationIds: ids });
      return;
    }
    const data = frame.data;
    if (!data || typeof data.id !== 'number') return;
    if (this.registrationId != null && data.id !== this.registrationId) return;
    this.applySnapshot(data, false);
  }

  applySnapshot(data, onlyIfNewer) {
    const known = this.seqs.get(data.id);
    if (known !== undefined && typeof data.seq === 'number') {
      if (onlyIfNewer ? data.seq <= known : data.seq < known) return;
    }
    if (typeof data.seq === 'number') this.seqs.set(data.id, data.seq);
    this.callbacks.onSnapshot({ resync: false, data });
  }

  /** Re-read one registration from the API and hand it over as a snapshot. */
  async resync(registrationId, { onlyIfNewer }) {
    if (this.resyncing.has(registrationId)) return;
    this.resyncing.add(registrationId);
    try {
      const data = await api(`/api/registrations/${registrationId}`);
      if (this.state !== 'closed' && data) this.applySnapshot(data, onlyIfNewer);
    } catch (error) {
      this.callbacks.onError(error);
    } finally {
      this.resyncing.delete(registrationId);
    }
  }
}

export function createRegistrationUpdates(options) {
  return new RegistrationUpdates(options);
}
