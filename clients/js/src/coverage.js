// @ts-check
// Whether the streams the leader holds carry a subscription's registrations (pure).

import { ALL, idsOfStreamKey } from './plan.js';

/** @typedef {'live' | 'switching' | 'polling' | 'down'} Coverage */

/**
 * @typedef {object} StreamStates
 * @property {Record<string, string>} states stream key → 'open' | 'connecting' | 'reconnecting'
 * @property {string[]} unserved registration keys no stream carries (polled)
 */

/**
 * One registration key: 'live' (an open stream carries it), 'switching' (a stream being opened
 * carries it), 'polling' (the leader cannot serve it) or 'down'.
 * @param {StreamStates} held
 * @param {string} key
 * @returns {Coverage}
 */
export function coverageOfKey({ states, unserved }, key) {
  if (states[ALL] === 'open') return 'live';
  let switching = false;
  if (key !== ALL) {
    for (const [streamKey, state] of Object.entries(states)) {
      if (streamKey === ALL || !idsOfStreamKey(streamKey)?.has(key)) continue;
      if (state === 'open') return 'live';
      if (state === 'connecting') switching = true;
    }
  }
  if (unserved.includes(key)) return 'polling';
  return switching ? 'switching' : 'down';
}

const RANK = { live: 0, switching: 1, polling: 2, down: 3 };

/**
 * A subscription: the worst of its keys; 'down' reads 'switching' while it changes its
 * registrations (until `switchingUntil`, ms), so a list page turning a page stays 'live'.
 * @param {StreamStates} held
 * @param {string[]} keys
 * @param {number} switchingUntil
 * @param {number} [now]
 * @returns {Coverage}
 */
export function coverageOf(held, keys, switchingUntil, now = Date.now()) {
  /** @type {Coverage} */
  let coverage = 'live';
  for (const key of keys) {
    const one = coverageOfKey(held, key);
    if (RANK[one] > RANK[coverage]) coverage = one;
    if (coverage === 'down') break;
  }
  if (coverage === 'down' && now < switchingUntil) return 'switching';
  return coverage;
}
