// @ts-check
// De-duplication and gap detection by (registrationId, seq). Each registration's updates carry
// seq 1, 2, 3 ... without gaps; a replay, an overlapping stream during a switch-over or a relay
// can repeat one, and a lost message shows as a jump.

/**
 * Per subscription: the last seq applied for each registration.
 */
export class SeqTracker {
  constructor() {
    /** @type {Map<number, number>} */
    this.seqs = new Map();
  }

  /**
   * What to do with an update: 'apply' (next in order, or the first seen), 'repeat' (already
   * applied: drop it) or 'gap' (apply it, then re-read the registration: some were missed).
   * @param {number} registrationId
   * @param {number} seq
   * @returns {'apply' | 'repeat' | 'gap'}
   */
  accept(registrationId, seq) {
    const known = this.seqs.get(registrationId);
    if (known !== undefined && seq <= known) return 'repeat';
    this.seqs.set(registrationId, seq);
    return known !== undefined && seq > known + 1 ? 'gap' : 'apply';
  }

  /** @param {number} registrationId */
  get(registrationId) {
    return this.seqs.get(registrationId);
  }

  /** Raise (never lower) what is known, e.g. a seq read from the API. @param {number} registrationId @param {number} seq */
  raise(registrationId, seq) {
    const known = this.seqs.get(registrationId);
    if (known === undefined || seq > known) this.seqs.set(registrationId, seq);
  }
}

/**
 * Bounded memory of delivered `registrationId:seq` pairs (the leader's, across its streams).
 */
export class RecentUpdates {
  /** @param {number} [max] */
  constructor(max = 5000) {
    this.max = max;
    /** @type {Set<string>} */
    this.seen = new Set();
  }

  /** True when this update was delivered before (and remember it otherwise). @param {number} registrationId @param {number} seq */
  isRepeat(registrationId, seq) {
    const key = `${registrationId}:${seq}`;
    if (this.seen.has(key)) return true;
    this.seen.add(key);
    if (this.seen.size > this.max) {
      let drop = this.seen.size / 2; // forget the oldest half (a Set iterates in insertion order)
      for (const old of this.seen) {
        if (drop-- <= 0) break;
        this.seen.delete(old);
      }
    }
    return false;
  }
}
