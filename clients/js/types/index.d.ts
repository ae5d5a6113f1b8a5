/**
 * Set how the client reaches the service (call before the first subscription; later calls apply
 * to streams opened afterwards).
 * @param {Partial<ClientConfig>} options
 */
export function configure(options: Partial<ClientConfig>): void;
/**
 * Follow one registration, several, or every one (admins).
 * @param {SubscriptionOptions} [options]
 */
export function createRegistrationUpdates(options?: SubscriptionOptions): RegistrationUpdates;
/**
 * Call `callback(update)` for every final update, in exactly one tab of this browser (the leader,
 * which holds the streams): for notifications that must not pop up once per tab.
 * @param {(update: RegistrationUpdate) => void} callback
 * @returns {() => void} stops the calls
 */
export function onFinalUpdate(callback: (update: RegistrationUpdate) => void): () => void;
/** This tab's role and the streams it holds (for tests and the console). */
export function debugState(): {
    role: "none" | "leader" | "follower";
    streams: string[];
    states: {
        [x: string]: string;
    };
};
export { RegistrationUpdates } from "./subscription.js";
export type RegistrationStatus = import("./wire.js").RegistrationStatus;
export type StageStatus = import("./wire.js").StageStatus;
export type Stage = import("./wire.js").Stage;
export type ProcessLogItem = import("./wire.js").ProcessLogItem;
export type RegistrationUpdate = import("./wire.js").RegistrationUpdate;
export type RegistrationSnapshot = import("./wire.js").RegistrationSnapshot;
export type ConnectedFrame = import("./wire.js").ConnectedFrame;
export type UpdateFrame = import("./wire.js").UpdateFrame;
export type PingFrame = import("./wire.js").PingFrame;
export type SnapshotFrame = import("./wire.js").SnapshotFrame;
export type AuthFrame = import("./wire.js").AuthFrame;
export type StreamFrame = import("./wire.js").StreamFrame;
export type ConnectionState = import("./subscription.js").ConnectionState;
export type Snapshot = import("./subscription.js").Snapshot;
export type SubscriptionOptions = import("./subscription.js").SubscriptionOptions;
export type ClientConfig = import("./http.js").ClientConfig;
export type Me = import("./http.js").Me;
import { RegistrationUpdates } from './subscription.js';
export { AuthRequiredError, HttpError } from "./http.js";
export { MAX_IDS_PER_STREAM, STREAM_PATH } from "./limits.js";
