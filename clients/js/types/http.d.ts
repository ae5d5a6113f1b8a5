/** @param {ClientConfig} config @param {string} path */
export function defaultFetchJson(config: ClientConfig, path: string): Promise<any>;
/** @param {ClientConfig} config @returns {Promise<Me | null>} */
export function defaultWhoAmI(config: ClientConfig): Promise<Me | null>;
/** @param {ClientConfig} config */
export function defaultAuthExpired(config: ClientConfig): Promise<boolean>;
/**
 * The URL of a stream: the cookie's own (same origin) or a fresh single-use ticket's.
 * @param {ClientConfig} config
 * @param {string} key a stream key (ALL, or registration ids joined by commas)
 * @param {string | null} lastEventId
 */
export function streamUrl(config: ClientConfig, key: string, lastEventId: string | null): Promise<string>;
/**
 * POST /api/auth/stream-ticket: a single-use ticket for one stream (one registration, or all for
 * an admin); valid about a minute, so one is minted right before each (re)connect.
 * @param {ClientConfig} config
 * @param {number | null} registrationId
 * @returns {Promise<{ticket: string, streamUrl: string, expiresIn: number}>}
 */
export function mintTicket(config: ClientConfig, registrationId: number | null): Promise<{
    ticket: string;
    streamUrl: string;
    expiresIn: number;
}>;
export class AuthRequiredError extends Error {
    /** @param {string} [reason] */
    constructor(reason?: string);
    reason: string;
}
export class HttpError extends Error {
    /** @param {number} status */
    constructor(status: number);
    status: number;
}
export type Me = {
    role: string | null;
};
export type ClientConfig = {
    /**
     * the service's origin ('' = this page's)
     */
    baseUrl: string;
    /**
     * an API token (Bearer) for REST calls and tickets
     */
    getToken: (() => string | null | Promise<string | null>) | null;
    /**
     * open streams with single-use stream tickets (needed across origins or with a token)
     */
    tickets: boolean;
    /**
     * GET a JSON document of the API
     */
    fetchJson: (path: string) => Promise<any>;
    /**
     * the signed-in person (null: the server has no sign-in)
     */
    whoAmI: () => Promise<Me | null>;
    /**
     * whether the credentials are gone (after a stream gave up)
     */
    authExpired: () => Promise<boolean>;
    /**
     * called once per tab when the credentials are gone
     */
    onAuthRequired: (reason: string) => void;
    /**
     * the leader tab: now - update.timestamp per delivered update
     */
    onLatency: ((latencyMs: number) => void) | null;
    /**
     * one connection per browser (Web Locks + BroadcastChannel)
     */
    shareAcrossTabs: boolean;
    EventSource: typeof EventSource | null;
};
