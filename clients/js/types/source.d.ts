/** @typedef {import('./wire.js').StreamFrame} StreamFrame */
/** @typedef {'connecting' | 'open' | 'reconnecting' | 'auth'} SourceState */
/**
 * @typedef {object} SourceEnv
 * @property {(key: string, lastEventId: string | null) => Promise<string>} urlFor
 * @property {() => Promise<boolean>} authExpired
 * @property {typeof EventSource} EventSource
 * @property {boolean} withCredentials
 * @property {boolean} singleUseUrls stream tickets: reopen ourselves on every error
 * @property {number} [ticketRetryMs] first delay before a fresh ticket (default 1000)
 * @property {() => number} [random]
 */
export class StreamSource {
    /**
     * @param {string} key
     * @param {object} options
     * @param {string | null} [options.lastEventId]
     * @param {SourceEnv} options.env
     * @param {(key: string, frame: StreamFrame, lastEventId: string | null) => void} options.onFrame
     * @param {(key: string, state: SourceState) => void} options.onState
     */
    constructor(key: string, { lastEventId, env, onFrame, onState }: {
        lastEventId?: string | null | undefined;
        env: SourceEnv;
        onFrame: (key: string, frame: StreamFrame, lastEventId: string | null) => void;
        onState: (key: string, state: SourceState) => void;
    });
    key: string;
    lastEventId: string | null;
    env: SourceEnv;
    onFrame: (key: string, frame: StreamFrame, lastEventId: string | null) => void;
    onState: (key: string, state: SourceState) => void;
    /** @type {SourceState} */
    state: SourceState;
    attempt: number;
    /** @type {ReturnType<typeof setTimeout> | null} */
    timer: ReturnType<typeof setTimeout> | null;
    /** @type {EventSource | null} */
    es: EventSource | null;
    closed: boolean;
    openedAt: number;
    open(): Promise<void>;
    /** @param {EventSource} es */
    giveUpAndRetry(es: EventSource): Promise<void>;
    retryLater(): void;
    /** @param {SourceState} state */
    setState(state: SourceState): void;
    close(): void;
}
export type StreamFrame = import("./wire.js").StreamFrame;
export type SourceState = "connecting" | "open" | "reconnecting" | "auth";
export type SourceEnv = {
    urlFor: (key: string, lastEventId: string | null) => Promise<string>;
    authExpired: () => Promise<boolean>;
    EventSource: typeof EventSource;
    withCredentials: boolean;
    /**
     * stream tickets: reopen ourselves on every error
     */
    singleUseUrls: boolean;
    /**
     * first delay before a fresh ticket (default 1000)
     */
    ticketRetryMs?: number | undefined;
    random?: (() => number) | undefined;
};
