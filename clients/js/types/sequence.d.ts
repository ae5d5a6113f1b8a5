/**
 * Per subscription: the last seq applied for each registration.
 */
export class SeqTracker {
    /** @type {Map<number, number>} */
    seqs: Map<number, number>;
    /**
     * What to do with an update: 'apply' (next in order, or the first seen), 'repeat' (already
     * applied: drop it) or 'gap' (apply it, then re-read the registration: some were missed).
     * @param {number} registrationId
     * @param {number} seq
     * @returns {'apply' | 'repeat' | 'gap'}
     */
    accept(registrationId: number, seq: number): "apply" | "repeat" | "gap";
    /** @param {number} registrationId */
    get(registrationId: number): number | undefined;
    /** Raise (never lower) what is known, e.g. a seq read from the API. @param {number} registrationId @param {number} seq */
    raise(registrationId: number, seq: number): void;
}
/**
 * Bounded memory of delivered `registrationId:seq` pairs (the leader's, across its streams).
 */
export class RecentUpdates {
    /** @param {number} [max] */
    constructor(max?: number);
    max: number;
    /** @type {Set<string>} */
    seen: Set<string>;
    /** True when this update was delivered before (and remember it otherwise). @param {number} registrationId @param {number} seq */
    isRepeat(registrationId: number, seq: number): boolean;
}
