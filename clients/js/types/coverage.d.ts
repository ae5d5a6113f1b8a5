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
export function coverageOfKey({ states, unserved }: StreamStates, key: string): Coverage;
/**
 * A subscription: the worst of its keys; 'down' reads 'switching' while it changes its
 * registrations (until `switchingUntil`, ms), so a list page turning a page stays 'live'.
 * @param {StreamStates} held
 * @param {string[]} keys
 * @param {number} switchingUntil
 * @param {number} [now]
 * @returns {Coverage}
 */
export function coverageOf(held: StreamStates, keys: string[], switchingUntil: number, now?: number): Coverage;
export type Coverage = "live" | "switching" | "polling" | "down";
export type StreamStates = {
    /**
     * stream key → 'open' | 'connecting' | 'reconnecting'
     */
    states: Record<string, string>;
    /**
     * registration keys no stream carries (polled)
     */
    unserved: string[];
};
