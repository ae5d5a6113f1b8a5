export class RegistrationUpdates {
    /**
     * @param {() => Coordinator} getCoordinator
     * @param {(path: string) => Promise<any>} fetchJson
     * @param {SubscriptionOptions} [options]
     */
    constructor(getCoordinator: () => Coordinator, fetchJson: (path: string) => Promise<any>, options?: SubscriptionOptions);
    getCoordinator: () => Coordinator;
    fetchJson: (path: string) => Promise<any>;
    registrationId: number | null;
    /** @type {Set<number> | null} followed registrations; null: every one */
    ids: Set<number> | null;
    switchingUntil: number;
    /** @type {ReturnType<typeof setTimeout> | null} */
    switchTimer: ReturnType<typeof setTimeout> | null;
    callbacks: {
        onUpdate: (update: RegistrationUpdate) => void;
        onSnapshot: (snapshot: Snapshot) => void;
        onConnected: () => void;
        onError: (error: Error) => void;
        onStateChange: (state: ConnectionState) => void;
    };
    resyncOnGap: boolean;
    /** @type {RegistrationUpdate | null} */
    latestUpdate: RegistrationUpdate | null;
    /** @type {ConnectionState} */
    state: ConnectionState;
    seqs: SeqTracker;
    /** @type {Set<number>} */
    resyncing: Set<number>;
    /** @type {ReturnType<typeof setInterval> | null} */
    pollTimer: ReturnType<typeof setInterval> | null;
    /** @type {Set<() => void>} */
    listeners: Set<() => void>;
    get isConnected(): boolean;
    /** Call `listener()` whenever `state` or `latestUpdate` changes; returns the unsubscribe. @param {() => void} listener */
    subscribe(listener: () => void): () => void;
    notify(): void;
    /** The registration keys this subscription needs carried. */
    keys(): string[];
    /** @param {number} registrationId */
    follows(registrationId: number): boolean;
    /**
     * Follow these registrations instead (null: every one; admins only, others poll). The stream
     * switches over without a gap; meanwhile the state stays what it was.
     * @param {Iterable<number> | null} registrationIds
     */
    follow(registrationIds: Iterable<number> | null): void;
    /** Tell the client what the page already shows (a seq read from the API). @param {number} registrationId @param {number} seq */
    setSeq(registrationId: number, seq: number): void;
    connect(): void;
    close(): void;
    /** Close and connect again (e.g. after signing in again). */
    reconnect(): void;
    /** @param {ConnectionState} state */
    setState(state: ConnectionState): void;
    /** @param {Coverage} coverage */
    setCoverage(coverage: Coverage): void;
    /** @param {string} reason */
    authRequired(reason: string): void;
    /** No stream for this filter: read the API instead (state 'polling'). */
    poll(): void;
    /** A frame routed here; `ids`: the registrations it is about (null: every one). @param {StreamFrame} frame @param {number[] | null} [ids] */
    receive(frame: StreamFrame, ids?: number[] | null): void;
    /** @param {RegistrationUpdate} update */
    receiveUpdate(update: RegistrationUpdate): void;
    /** @param {SnapshotFrame} frame @param {number[] | null} routed */
    receiveSnapshot(frame: SnapshotFrame, routed?: number[] | null): void;
    /** @param {RegistrationSnapshot} data @param {boolean} onlyIfNewer */
    applySnapshot(data: RegistrationSnapshot, onlyIfNewer: boolean): void;
    /** Re-read one registration from the API and hand it over as a snapshot. @param {number} registrationId @param {{onlyIfNewer: boolean}} how */
    resync(registrationId: number, { onlyIfNewer }: {
        onlyIfNewer: boolean;
    }): Promise<void>;
}
export type RegistrationUpdate = import("./wire.js").RegistrationUpdate;
export type RegistrationSnapshot = import("./wire.js").RegistrationSnapshot;
export type StreamFrame = import("./wire.js").StreamFrame;
export type SnapshotFrame = import("./wire.js").SnapshotFrame;
export type Coordinator = import("./coordinator.js").Coordinator;
export type Coverage = import("./coordinator.js").Coverage;
/**
 * 'connecting' → 'live' (a stream carries every followed registration) or 'polling' (the API is
 * read every few seconds instead); 'reconnecting' after a drop; 'unauthorized' when the
 * credentials are gone; 'closed' after close().
 */
export type ConnectionState = "connecting" | "live" | "polling" | "reconnecting" | "unauthorized" | "closed";
/**
 * `{resync: false, data}`: a registration's whole state; `{resync: true, registrationIds}`:
 * re-read these (null: every one followed) from the API.
 */
export type Snapshot = {
    resync: false;
    data: RegistrationSnapshot;
} | {
    resync: true;
    registrationIds: number[] | null;
    polling?: boolean;
};
export type SubscriptionOptions = {
    /**
     * one registration (the detail page)
     */
    registrationId?: number | null | undefined;
    /**
     * instead: several (a list page); follow() changes them; neither: every registration
     */
    registrationIds?: Iterable<number> | null | undefined;
    onUpdate?: ((update: RegistrationUpdate) => void) | undefined;
    onSnapshot?: ((snapshot: Snapshot) => void) | undefined;
    onConnected?: (() => void) | undefined;
    onError?: ((error: Error) => void) | undefined;
    onStateChange?: ((state: ConnectionState) => void) | undefined;
    /**
     * default true
     */
    autoConnect?: boolean | undefined;
    /**
     * default true
     */
    resyncOnGap?: boolean | undefined;
};
import { SeqTracker } from './sequence.js';
