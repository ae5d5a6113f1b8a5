// @ts-check
// A subscription: the registrations a page follows, de-duplicated and gap-checked updates,
// snapshots and re-syncs, and an observable connection state.
//
// Gaps: each registration's updates carry seq 1, 2, 3 ... A subscription that sees a seq jump
// re-reads that registration from the API and hands it over as a snapshot. A subscription to
// some registrations also re-reads them whenever it becomes live (a multi-registration one gets
// onSnapshot({resync: true})), which closes the window between a page's first fetch and the
// stream being open, and the one of a reconnect without a Last-Event-ID.

import { ALL } from './plan.js';
import { SeqTracker } from './sequence.js';
import { AuthRequiredError } from './http.js';

/** @typedef {import('./wire.js').RegistrationUpdate} RegistrationUpdate */
/** @typedef {import('./wire.js').RegistrationSnapshot} RegistrationSnapshot */
/** @typedef {import('./wire.js').StreamFrame} StreamFrame */
/** @typedef {import('./wire.js').SnapshotFrame} SnapshotFrame */
/** @typedef {import('./coordinator.js').Coordinator} Coordinator */
/** @typedef {import('./coordinator.js').Coverage} Coverage */

/**
 * 'connecting' → 'live' (a stream carries every followed registration) or 'polling' (the API is
 * read every few seconds instead); 'reconnecting' after a drop; 'unauthorized' when the
 * credentials are gone; 'closed' after close().
 * @typedef {'connecting' | 'live' | 'polling' | 'reconnecting' | 'unauthorized' | 'closed'} ConnectionState
 */

/**
 * `{resync: false, data}`: a registration's whole state; `{resync: true, registrationIds}`:
 * re-read these (null: every one followed) from the API.
 * @typedef {{resync: false, data: RegistrationSnapshot} | {resync: true, registrationIds: number[] | null, polling?: boolean}} Snapshot
 */

/**
 * @typedef {object} SubscriptionOptions
 * @property {number | null} [registrationId] one registration (the detail page)
 * @property {Iterable<number> | null} [registrationIds] instead: several (a list page); follow() changes them; neither: every registration
 * @property {(update: RegistrationUpdate) => void} [onUpdate]
 * @property {(snapshot: Snapshot) => void} [onSnapshot]
 * @property {() => void} [onConnected]
 * @property {(error: Error) => void} [onError]
 * @property {(state: ConnectionState) => void} [onStateChange]
 * @property {boolean} [autoConnect] default true
 * @property {boolean} [resyncOnGap] default true
 */

const POLL_MS = 3000;
const SWITCH_GRACE_MS = 3000; // a subscription that changed its registrations stays 'live' meanwhile
const noop = () => {};

export class RegistrationUpdates {
  /**
   * @param {() => Coordinator} getCoordinator
   * @param {(path: string) => Promise<any>} fetchJson
   * @param {SubscriptionOptions} [options]
   */
  constructor(getCoordinator, fetchJson, options = {}) {
    const { registrationId = null, registrationIds = null, autoConnect = true, resyncOnGap = true } = options;
    this.getCoordinator = getCoordinator;
    this.fetchJson = fetchJson;
    this.registrationId = registrationId == null ? null : Number(registrationId);
    /** @type {Set<number> | null} followed registrations; null: every one */
    this.ids = this.registrationId != null ? new Set([this.registrationId]) : null;
    if (this.registrationId == null && registrationIds != null) this.ids = idSet(registrationIds);
    this.switchingUntil = 0;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.switchTimer = null;
    this.callbacks = {
      onUpdate: options.onUpdate || noop,
      onSnapshot: options.onSnapshot || noop,
      onConnected: options.onConnected || noop,
      onError: options.onError || noop,
      onStateChange: options.onStateChange || noop,
    };
    this.resyncOnGap = resyncOnGap;
    /** @type {RegistrationUpdate | null} */
    this.latestUpdate = null;
    /** @type {ConnectionState} */
    this.state = 'closed';
    this.seqs = new SeqTracker();
    /** @type {Set<number>} */
    this.resyncing = new Set();
    /** @type {ReturnType<typeof setInterval> | null} */
    this.pollTimer = null;
    /** @type {Set<() => void>} */
    this.listeners = new Set();
    if (autoConnect) this.connect();
  }

  get isConnected() {
    return this.state === 'live';
  }

  /** Call `listener()` whenever `state` or `latestUpdate` changes; returns the unsubscribe. @param {() => void} listener */
  subscribe(listener) {
    this.listeners.add(listener);
    return () => {
      this.listeners.delete(listener);
    };
  }

  notify() {
    for (const listener of [...this.listeners]) listener();
  }

  /** The registration keys this subscription needs carried. */
  keys() {
    return this.ids === null ? [ALL] : [...this.ids].map(String);
  }

  /** @param {number} registrationId */
  follows(registrationId) {
    return this.ids === null || this.ids.has(registrationId);
  }

  /**
   * Follow these registrations instead (null: every one; admins only, others poll). The stream
   * switches over without a gap; meanwhile the state stays what it was.
   * @param {Iterable<number> | null} registrationIds
   */
  follow(registrationIds) {
    if (this.registrationId != null) throw new Error('follow() is for a subscription without registrationId');
    const next = registrationIds == null ? null : idSet(registrationIds);
    const same = next === null ? this.ids === null : this.ids !== null && sameSet(this.ids, next);
    if (same) return;
    this.ids = next;
    if (this.state === 'closed') return;
    this.switchingUntil = Date.now() + SWITCH_GRACE_MS;
    if (this.switchTimer) clearTimeout(this.switchTimer);
    this.switchTimer = setTimeout(() => {
      this.switchTimer = null;
      if (this.state !== 'closed') this.setCoverage(this.getCoordinator().covers(this));
    }, SWITCH_GRACE_MS + 50);
    this.getCoordinator().needsChanged();
  }

  /** Tell the client what the page already shows (a seq read from the API). @param {number} registrationId @param {number} seq */
  setSeq(registrationId, seq) {
    if (typeof seq === 'number') this.seqs.raise(registrationId, seq);
  }

  connect() {
    if (this.state !== 'closed' && this.state !== 'unauthorized') return;
    this.setState('connecting');
    this.getCoordinator().add(this);
  }

  close() {
    if (this.state === 'closed') return;
    if (this.switchTimer) clearTimeout(this.switchTimer);
    this.switchTimer = null;
    this.getCoordinator().remove(this);
    this.setState('closed');
  }

  /** Close and connect again (e.g. after signing in again). */
  reconnect() {
    this.close();
    this.connect();
  }

  /** @param {ConnectionState} state */
  setState(state) {
    if (this.state === state) return;
    const previous = this.state;
    this.state = state;
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.pollTimer = null;
    if (state === 'polling') {
      this.pollTimer = setInterval(() => this.poll(), POLL_MS);
      this.poll();
    }
    this.callbacks.onStateChange(state);
    this.notify();
    if (state === 'live') {
      this.callbacks.onConnected();
      if (this.registrationId != null) void this.resync(this.registrationId, { onlyIfNewer: true });
      else if (this.ids !== null && this.ids.size > 0) {
        // A multi-registration stream (re)starts without snapshots: re-read what may have
        // changed while no stream carried these registrations.
        this.callbacks.onSnapshot({ resync: true, registrationIds: [...this.ids] });
      }
    } else if (state === 'reconnecting' && previous === 'live') {
      this.callbacks.onError(new Error('stream connection lost; reconnecting'));
    }
  }

  /** @param {Coverage} coverage */
  setCoverage(coverage) {
    if (this.state === 'closed' || this.state === 'unauthorized' || coverage === 'switching') return;
    if (coverage === 'live' || coverage === 'polling') this.setState(coverage);
    else if (this.state === 'live' || this.state === 'polling') this.setState('reconnecting');
  }

  /** @param {string} reason */
  authRequired(reason) {
    if (this.state === 'closed') return;
    this.setState('unauthorized');
    this.callbacks.onError(new AuthRequiredError(reason));
  }

  /** No stream for this filter: read the API instead (state 'polling'). */
  poll() {
    if (typeof document !== 'undefined' && document.hidden) return;
    if (this.registrationId != null) void this.resync(this.registrationId, { onlyIfNewer: true });
    else this.callbacks.onSnapshot({ resync: true, registrationIds: null, polling: true });
  }

  /** A frame routed here; `ids`: the registrations it is about (null: every one). @param {StreamFrame} frame @param {number[] | null} [ids] */
  receive(frame, ids = null) {
    if (this.state === 'closed') return;
    if (frame.type === 'update') this.receiveUpdate(frame.data);
    else if (frame.type === 'snapshot') this.receiveSnapshot(frame, ids);
  }

  /** @param {RegistrationUpdate} update */
  receiveUpdate(update) {
    if (!update || typeof update !== 'object') return;
    const rid = update.registrationId;
    if (typeof rid === 'number' && !this.follows(rid)) return;
    if (typeof update.seq === 'number' && typeof rid === 'number') {
      const verdict = this.seqs.accept(rid, update.seq);
      if (verdict === 'repeat') return; // already applied (replay, overlap)
      if (verdict === 'gap' && this.resyncOnGap) void this.resync(rid, { onlyIfNewer: false });
    }
    this.latestUpdate = update;
    this.callbacks.onUpdate(update);
    this.notify();
  }

  /** @param {SnapshotFrame} frame @param {number[] | null} routed */
  receiveSnapshot(frame, routed = null) {
    const data = frame.data;
    if (frame.resync) {
      const listed = data && 'registrationIds' in data && Array.isArray(data.registrationIds) ? data.registrationIds : null;
      const ids = listed || routed;
      if (this.registrationId != null) {
        if (!ids || ids.includes(this.registrationId)) void this.resync(this.registrationId, { onlyIfNewer: false });
        return;
      }
      this.callbacks.onSnapshot({ resync: true, registrationIds: ids });
      return;
    }
    if (!data || !('id' in data) || typeof data.id !== 'number') return;
    if (!this.follows(data.id)) return;
    this.applySnapshot(data, false);
  }

  /** @param {RegistrationSnapshot} data @param {boolean} onlyIfNewer */
  applySnapshot(data, onlyIfNewer) {
    const known = this.seqs.get(data.id);
    if (known !== undefined && typeof data.seq === 'number') {
      if (onlyIfNewer ? data.seq <= known : data.seq < known) return;
    }
    if (typeof data.seq === 'number') this.seqs.raise(data.id, data.seq);
    this.callbacks.onSnapshot({ resync: false, data });
  }

  /** Re-read one registration from the API and hand it over as a snapshot. @param {number} registrationId @param {{onlyIfNewer: boolean}} how */
  async resync(registrationId, { onlyIfNewer }) {
    if (this.resyncing.has(registrationId)) return;
    this.resyncing.add(registrationId);
    try {
      const data = await this.fetchJson(`/api/registrations/${registrationId}`);
      if (this.state !== 'closed' && data) this.applySnapshot(data, onlyIfNewer);
    } catch (error) {
      if (this.state !== 'closed') this.callbacks.onError(error instanceof Error ? error : new Error(String(error)));
    } finally {
      this.resyncing.delete(registrationId);
    }
  }
}

/** @param {Iterable<number>} ids */
function idSet(ids) {
  return new Set([...ids].map(Number).filter((id) => Number.isSafeInteger(id) && id > 0));
}

/** @param {Set<number>} a @param {Set<number>} b */
function sameSet(a, b) {
  if (a.size !== b.size) return false;
  for (const x of a) if (!b.has(x)) return false;
  return true;
}
