/** @type {Set<(update: RegistrationUpdate) => void>} */
export const finalListeners: Set<(update: RegistrationUpdate) => void>;
export class Coordinator {
    /** @param {() => ClientConfig} getConfig */
    constructor(getConfig: () => ClientConfig);
    getConfig: () => ClientConfig;
    tabId: string;
    /** @type {Set<Member>} */
    subs: Set<Member>;
    /** @type {'none' | 'leader' | 'follower'} */
    role: "none" | "leader" | "follower";
    started: boolean;
    /** @type {Map<string, StreamSource>} leader only: stream key → source */
    sources: Map<string, StreamSource>;
    /** @type {Map<string, {keys: Set<string>, seen: number}>} leader only: tabId → its keys */
    needs: Map<string, {
        keys: Set<string>;
        seen: number;
    }>;
    /** @type {Record<string, string>} stream key → 'open' | 'connecting' | 'reconnecting' */
    states: Record<string, string>;
    /** @type {string | null} the latest history position seen on any stream */
    lastId: string | null;
    /** @type {Me | null | undefined} undefined: not known yet; null: no sign-in on the server */
    me: Me | null | undefined;
    /** @type {string[]} registration keys no stream carries (polled) */
    unserved: string[];
    recent: RecentUpdates;
    /** @type {ReturnType<typeof setTimeout> | null} */
    reconcileTimer: ReturnType<typeof setTimeout> | null;
    /** @type {ReturnType<typeof setInterval> | null} */
    heartbeat: ReturnType<typeof setInterval> | null;
    /** @type {BroadcastChannel | null} */
    channel: BroadcastChannel | null;
    /** @type {AbortController | null} */
    lockAbort: AbortController | null;
    /** @type {(() => void) | null} */
    releaseLock: (() => void) | null;
    generation: number;
    /** Forget everything of the last session (stop()); the same fields as the constructor's. */
    reset(): void;
    get shared(): boolean;
    /** @param {Member} sub */
    add(sub: Member): void;
    /** @param {Member} sub */
    remove(sub: Member): void;
    localKeys(): string[];
    start(): void;
    /** Close everything this tab holds; the next add() starts again. */
    stop(): void;
    onPageHide: () => void;
    /** Back from the back/forward cache: our streams and needs were given up in leave(). @param {PageTransitionEvent} event */
    onPageShow: (event: PageTransitionEvent) => void;
    /** @param {'none' | 'leader' | 'follower'} role */
    setRole(role: "none" | "leader" | "follower"): void;
    /** @param {object} message */
    post(message: object): void;
    becomeLeader(): void;
    leave(): void;
    /** @param {any} message */
    onMessage(message: any): void;
    needsChanged(): void;
    pruneNeeds(): void;
    /** [stream keys to hold, registration keys to poll]. */
    plan(): {
        streams: string[];
        unserved: string[];
    };
    scheduleReconcile(): void;
    /** Leader: open the streams wanted; close the others once the wanted ones are open. */
    reconcile(): void;
    /** Where a new stream starts: the latest position seen, best of the open streams. */
    resumePosition(): string | null;
    /** @param {string} key @param {StreamFrame} frame @param {string | null} id */
    onSourceFrame(key: string, frame: StreamFrame, id: string | null): void;
    /** @param {string} key @param {import('./source.js').SourceState} state */
    onSourceState(key: string, state: import("./source.js").SourceState): void;
    /** The credentials are gone: every tab is told once; subscriptions get an error. @param {string} reason */
    authRequired(reason: string, tellOthers?: boolean): void;
    broadcastStates(): void;
    /** @param {Record<string, string>} states @param {string[]} unserved */
    setStates(states: Record<string, string>, unserved: string[]): void;
    /** A subscription's coverage. @param {Member} sub @returns {Coverage} */
    covers(sub: Member): Coverage;
    refreshCoverage(): void;
    /** Hand a frame to the subscriptions following its registration(s). @param {string} key @param {StreamFrame} frame @param {string | null} id */
    dispatch(key: string, frame: StreamFrame, id: string | null): void;
}
export type StreamFrame = import("./wire.js").StreamFrame;
export type RegistrationUpdate = import("./wire.js").RegistrationUpdate;
export type ClientConfig = import("./http.js").ClientConfig;
export type Me = import("./http.js").Me;
export type Coverage = import("./coverage.js").Coverage;
/**
 * What the coordinator needs from a subscription.
 */
export type Member = {
    keys: () => string[];
    follows: (registrationId: number) => boolean;
    receive: (frame: StreamFrame, ids: number[] | null) => void;
    setCoverage: (coverage: Coverage) => void;
    authRequired: (reason: string) => void;
    switchingUntil: number;
};
import { StreamSource } from './source.js';
import { RecentUpdates } from './sequence.js';
