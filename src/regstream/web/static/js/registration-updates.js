// registration-updates.js: the seed's useRegistrationUpdates hook as a plain ES module, used by
// every page.
//
//   import { createRegistrationUpdates } from '/static/js/registration-updates.js';
//   const updates = createRegistrationUpdates({
//     registrationId: 42,            // or null: every registration
//     registrationIds: [1, 2, 3],    // instead: several registrations (a list page); follow() changes them
//     onUpdate(update) {}, onSnapshot(snapshot) {}, onConnected() {}, onError(error) {},
//     onStateChange(state) {},       // 'connecting' | 'live' | 'polling' | 'reconnecting' | 'closed'
//     autoConnect: true,
//   });
//   updates.isConnected; updates.latestUpdate; updates.follow([4, 5]); updates.close();
//
// Frames (api/stream.py): connected, update (with an SSE id), ping, snapshot ({data} = the
// registration with processLog and seq; {resync: true[, data.registrationIds]} = re-read from the
// API), auth (credentials expired).
//
// Many tabs, one stream. The tabs of a browser elect a leader with the Web Locks API (the lock
// is released when the leader tab closes, so the next waiting tab takes over). Only the leader
// holds EventSources; it relays every frame to the other tabs over a BroadcastChannel, and the
// other tabs tell it which registrations they follow. Frames are routed by registration (an
// update's registrationId, a snapshot's id), not by stream: a subscription gets the frames of the
// registrations it follows, whichever stream carried them.
//
// Which streams. The unfiltered stream is for admins (api/auth.py): for an admin the leader
// opens that one stream. Anyone else gets ONE stream following every registration the tabs want,
// `?registrationId=1,2,3` (sorted ids; at most MAX_IDS_PER_STREAM, the rest is polled). When the
// wanted set changes (a tab opens or closes, the list page turns a page) the leader opens the new
// stream resuming from the last event id seen (ids are global; the server filters the replay by
// the new set) and closes the old one only once the new one is open, so nothing is missed; the
// overlap's duplicates are dropped by (registrationId, seq). A filter the leader cannot serve (a
// non-admin following every registration) is polled from the API instead, and its state reads
// 'polling', never 'live'. However many tabs are open, the browser holds one stream, two while
// switching over (three at most), below HTTP/1.1's six connections per host with room for page
// loads. Without Web Locks (an insecure context) each tab holds its own streams.
//
// Reconnects: EventSource reconnects by itself, paced by the server's retry:, and sends
// Last-Event-ID. Only when it gave up (readyState CLOSED: a 502 during a deploy, a 401) do we open
// a new one, after 5 s, then exponentially longer with jitter, resuming with ?lastEventId=. First
// we ask /api/auth/me: a 401 means the sign-in expired, and we send the person to /login rather
// than show stale data.
//
// Gaps: each registration's updates carry seq 1, 2, 3 ... A subscription that sees a seq jump
// re-reads that registration from the API and hands it over as a snapshot. A subscription to
// some registrations also re-reads them whenever it becomes live (onSnapshot({resync: true}) for
// a multi-registration one), which closes the window between a page's first fetch and the stream
// being open, and the one of a reconnect without a Last-Event-ID. A multi-registration stream
// whose resume the history cannot cover sends {resync: true}: the subscriptions following any of
// its registrations re-read them (the list page re-fetches its page).
//
// Latency: the leader reports now - update.timestamp (ms) in batches, at most every 5 s.

import { api, goToLogin, signInExpired, getMe } from './session.js';

export const STREAM_PATH = '/api/registrations/updates/stream';
const CHANNEL_NAME = 'regstream-stream';
const LOCK_NAME = 'regstream-stream';
export const MAX_IDS_PER_STREAM = 200; // api/stream.py MAX_IDS
const POLL_MS = 3000;
const FIRST_RETRY_MS = 5000;
const MAX_RETRY_MS = 60000;
const HEARTBEAT_MS = 20000;
const STALE_NEED_MS = 5 * 60000; // timers of hidden tabs may run once a minute
const LATENCY_FLUSH_MS = 5000;
const LATENCY_MAX_BATCH = 200;
const ALL = '*';
const SWITCH_GRACE_MS = 3000; // a subscription that changed its registrations stays 'live' meanwhile
const RECENT_MAX = 5000;

// Keys: ALL, or a registration id as a string. A stream's key is ALL or its sorted ids joined by
// commas ("42" is a single-registration stream, which gets a snapshot at start).
const idsOfStreamKey = (() => {
  const cache = new Map();
  return (key) => {
    if (key === ALL) return null;
    let ids = cache.get(key);
    if (!ids) {
      if (cache.size > 100) cache.clear();
      ids = new Set(key.split(','));
      cache.set(key, ids);
    }
    return ids;
  };
})();

/** An event id without a snapshot's "~seq" (that floor belongs to one registration's stream). */
const positionOf = (id) => (id ? String(id).split('~')[0] : null);

function parseEventId(id) {
  const match = /^(\d+)_(\d+)-(\d+)$/.exec(positionOf(id) || '');
  return match ? { epoch: match[1], ms: Number(match[2]), n: Number(match[3]) } : null;
}

/** The later of two history positions (ids are global); b when they cannot be compared. */
function laterId(a, b) {
  if (!a) return b;
  if (!b) return a;
  const pa = parseEventId(a);
  const pb = parseEventId(b);
  if (!pa || !pb || pa.epoch !== pb.epoch) return b;
  return pa.ms > pb.ms || (pa.ms === pb.ms && pa.n > pb.n) ? a : b;
}

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
    this.openedAt = 0;
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
    this.states = {}; // stream key → 'open' | 'connecting' | 'reconnecting'
    this.lastId = null; // the latest history position seen on any stream (to resume from)
    this.me = undefined; // undefined: not known yet; null: sign-in is not enabled (open API)
    this.unserved = []; // registration keys no stream carries (polled)
    this.recent = new Set(); // leader: "registrationId:seq" delivered (overlapping streams repeat)
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
    sub.setCoverage(this.covers(sub));
  }

  remove(sub) {
    this.subs.delete(sub);
    this.needsChanged();
  }

  localKeys() {
    const keys = new Set();
    for (const sub of this.subs) for (const key of sub.keys()) keys.add(key);
    return [...keys];
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

  /** [stream keys to hold, registration keys to poll]. */
  plan() {
    const keys = new Set(this.localKeys());
    for (const need of this.needs.values()) for (const key of need.keys) keys.add(key);
    if (keys.size === 0) return [[], []];
    const unfilteredAllowed = this.me === null || this.me.role === 'admin';
    if (unfilteredAllowed && (keys.has(ALL) || this.me !== null)) return [[ALL], []];
    const ids = [...keys]
      .filter((key) => key !== ALL)
      .map(Number)
      .filter((id) => Number.isSafeInteger(id) && id > 0)
      .sort((a, b) => a - b);
    if (ids.length > MAX_IDS_PER_STREAM && unfilteredAllowed) return [[ALL], []];
    const held = ids.slice(0, MAX_IDS_PER_STREAM);
    const unserved = ids.slice(MAX_IDS_PER_STREAM).map(String);
    if (keys.has(ALL)) unserved.push(ALL); // the unfiltered stream is for admins: poll
    return [held.length ? [held.join(',')] : [], unserved];
  }

  scheduleReconcile() {
    if (this.reconcileTimer) return;
    this.reconcileTimer = setTimeout(() => {
      this.reconcileTimer = null;
      this.reconcile();
    }, 30);
  }

  /** Leader: open the streams wanted; close the others once the wanted ones are open. */
  reconcile() {
    if (this.role !== 'leader' || this.me === undefined) return;
    const [wanted, unserved] = this.plan();
    this.unserved = unserved;
    for (const key of wanted) {
      if (this.sources.has(key)) continue;
      // Resume where the streams held so far are (ids are global; the server filters the replay
      // by this stream's registrations), so a switch-over or a new leader misses nothing.
      const source = new StreamSource(key, {
        lastEventId: this.resumePosition(),
        onFrame: (k, frame, id) => this.onSourceFrame(k, frame, id),
        onState: (k, state) => this.onSourceState(k, state),
      });
      this.sources.set(key, source);
      this.states[key] = 'connecting';
      source.open();
    }
    // Until every wanted stream is open, keep the newest open stream it replaces (one: the
    // browser holds at most wanted + 1 streams).
    const ready = wanted.every((key) => this.sources.get(key).state === 'open');
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

  /** Leader: drop an update an overlapping stream already delivered. */
  isRepeat(frame) {
    if (frame.type !== 'update' || !frame.data) return false;
    const { registrationId, seq } = frame.data;
    if (typeof registrationId !== 'number' || typeof seq !== 'number') return false;
    const seen = `${registrationId}:${seq}`;
    if (this.recent.has(seen)) return true;
    this.recent.add(seen);
    if (this.recent.size > RECENT_MAX) {
      // Forget the oldest half (a Set iterates in insertion order).
      let drop = this.recent.size / 2;
      for (const old of this.recent) {
        if (drop-- <= 0) break;
        this.recent.delete(old);
      }
    }
    return false;
  }

  onSourceFrame(key, frame, id) {
    if (id) this.lastId = laterId(this.lastId, positionOf(id));
    if (this.isRepeat(frame)) return;
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
      for (const callback of finalListeners) callback(frame.data);
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

  /** One registration key: 'live' (an open stream carries it), 'switching' (a stream being
   * opened carries it), 'polling' (the leader cannot serve it) or 'down'. */
  coverageOfKey(key) {
    if (this.states[ALL] === 'open') return 'live';
    let switching = false;
    if (key !== ALL) {
      for (const [streamKey, state] of Object.entries(this.states)) {
        if (streamKey === ALL || !idsOfStreamKey(streamKey).has(key)) continue;
        if (state === 'open') return 'live';
        if (state === 'connecting') switching = true;
      }
    }
    if (this.unserved.includes(key)) return 'polling';
    return switching ? 'switching' : 'down';
  }

  /** A subscription: the worst of its keys ('switching': keep the state it has). */
  covers(sub) {
    const rank = { live: 0, switching: 1, polling: 2, down: 3 };
    let coverage = 'live';
    for (const key of sub.keys()) {
      const one = this.coverageOfKey(key);
      if (rank[one] > rank[coverage]) coverage = one;
      if (coverage === 'down') break;
    }
    if (coverage === 'down' && Date.now() < sub.switchingUntil) return 'switching';
    return coverage;
  }

  refreshCoverage() {
    for (const sub of this.subs) sub.setCoverage(this.covers(sub));
  }

  /** Hand a frame to the subscriptions following its registration(s). */
  dispatch(key, frame, id) {
    if (id) this.lastId = laterId(this.lastId, positionOf(id));
    let ids = null; // null: every subscription
    if (frame.type === 'update' && frame.data && typeof frame.data.registrationId === 'number') {
      ids = [frame.data.registrationId];
    } else if (frame.type === 'snapshot') {
      if (frame.resync) {
        const listed = frame.data && Array.isArray(frame.data.registrationIds) ? frame.data.registrationIds : null;
        const carried = idsOfStreamKey(key);
        ids = listed || (carried ? [...carried].map(Number) : null);
      } else if (frame.data && typeof frame.data.id === 'number') {
        ids = [frame.data.id];
      }
    } else if (frame.type !== 'auth') {
      return; // connected, ping: nothing for the pages
    }
    for (const sub of [...this.subs]) {
      if (ids === null || ids.some((rid) => sub.follows(rid))) sub.receive(frame, ids);
    }
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
    registrationIds = null,
    onUpdate = () => {},
    onSnapshot = () => {},
    onConnected = () => {},
    onError = () => {},
    onStateChange = () => {},
    autoConnect = true,
    resyncOnGap = true,
  } = {}) {
    this.registrationId = registrationId == null ? null : Number(registrationId);
    // Followed registrations: null = every one; a Set of ids otherwise.
    this.ids = this.registrationId != null ? new Set([this.registrationId]) : null;
    this.switchingUntil = 0;
    this.switchTimer = null;
    if (this.registrationId == null && registrationIds != null) this.ids = idSet(registrationIds);
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

  /** The registration keys this subscription needs carried. */
  keys() {
    return this.ids === null ? [ALL] : [...this.ids].map(String);
  }

  follows(registrationId) {
    return this.ids === null || this.ids.has(registrationId);
  }

  /**
   * Follow these registrations instead (null: every one; admins only, others poll). The stream
   * switches over without a gap; meanwhile the state stays what it was.
   */
  follow(registrationIds) {
    if (this.registrationId != null) throw new Error('follow() is for a subscription without registrationId');
    const next = registrationIds == null ? null : idSet(registrationIds);
    const same = next === null ? this.ids === null : this.ids !== null && sameSet(this.ids, next);
    if (same) return;
    this.ids = next;
    if (this.state === 'closed') return;
    this.switchingUntil = Date.now() + SWITCH_GRACE_MS;
    clearTimeout(this.switchTimer);
    this.switchTimer = setTimeout(() => {
      if (this.state !== 'closed') this.setCoverage(getCoordinator().covers(this));
    }, SWITCH_GRACE_MS + 50);
    getCoordinator().needsChanged();
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
    clearTimeout(this.switchTimer);
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
      else if (this.ids !== null && this.ids.size > 0) {
        // A multi-registration stream (re)starts without snapshots, and the browser's own
        // reconnect of a stream that has seen no update yet has no Last-Event-ID: re-read what
        // may have changed while no stream carried these registrations.
        this.callbacks.onSnapshot({ resync: true, registrationIds: [...this.ids] });
      }
    } else if (state === 'reconnecting' && previous === 'live') {
      this.callbacks.onError(new Error('stream connection lost; reconnecting'));
    }
  }

  setCoverage(coverage) {
    if (this.state === 'closed' || coverage === 'switching') return;
    if (coverage === 'live' || coverage === 'polling') this.setState(coverage);
    else if (this.state === 'live' || this.state === 'polling') this.setState('reconnecting');
  }

  /** No stream for this filter: read the API instead (state 'polling'). */
  poll() {
    if (document.hidden) return;
    if (this.registrationId != null) this.resync(this.registrationId, { onlyIfNewer: true });
    else this.callbacks.onSnapshot({ resync: true, registrationIds: null, polling: true });
  }

  /** A frame routed here; ``ids``: the registrations it is about (null: every one). */
  receive(frame, ids = null) {
    if (this.state === 'closed') return;
    switch (frame.type) {
      case 'update':
        this.receiveUpdate(frame.data);
        return;
      case 'snapshot':
        this.receiveSnapshot(frame, ids);
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
    if (typeof rid === 'number' && !this.follows(rid)) return;
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

  receiveSnapshot(frame, routed = null) {
    if (frame.resync) {
      const listed = frame.data && Array.isArray(frame.data.registrationIds) ? frame.data.registrationIds : null;
      const ids = listed || routed;
      if (this.registrationId != null) {
        if (!ids || ids.includes(this.registrationId)) this.resync(this.registrationId, { onlyIfNewer: false });
        return;
      }
      this.callbacks.onSnapshot({ resync: true, registrationIds: ids });
      return;
    }
    const data = frame.data;
    if (!data || typeof data.id !== 'number') return;
    if (!this.follows(data.id)) return;
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

function idSet(ids) {
  return new Set([...ids].map(Number).filter((id) => Number.isSafeInteger(id) && id > 0));
}

function sameSet(a, b) {
  if (a.size !== b.size) return false;
  for (const x of a) if (!b.has(x)) return false;
  return true;
}

export function createRegistrationUpdates(options) {
  return new RegistrationUpdates(options);
}
