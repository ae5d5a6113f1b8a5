/** @param {State} state @param {Action} action @returns {State} */
export function reduce(state: State, action: Action): State;
/** @param {State} state */
export function progressOf(state: State): number;
/**
 * Follow one registration's updates live (or every registration's, for an admin).
 * @param {UseRegistrationUpdatesOptions} [options]
 * @returns {RegistrationUpdatesState}
 */
export function useRegistrationUpdates(options?: UseRegistrationUpdatesOptions): RegistrationUpdatesState;
/** @typedef {import('./wire.js').RegistrationUpdate} RegistrationUpdate */
/** @typedef {import('./wire.js').RegistrationStatus} RegistrationStatus */
/** @typedef {import('./wire.js').RegistrationSnapshot} RegistrationSnapshot */
/** @typedef {import('./wire.js').StageStatus} StageStatus */
/** @typedef {import('./subscription.js').ConnectionState} ConnectionState */
/**
 * @typedef {object} UseRegistrationUpdatesOptions
 * @property {number | null} [registrationId] the registration to follow (none: every one, admins)
 * @property {(update: RegistrationUpdate) => void} [onUpdate]
 * @property {() => void} [onConnected]
 * @property {(error: Error) => void} [onError]
 * @property {boolean} [autoConnect] default true; false: connect on reconnect()
 */
/**
 * @typedef {object} StageProgress
 * @property {string} stage
 * @property {StageStatus} status
 * @property {string} message
 * @property {number} timestamp
 */
/**
 * @typedef {object} RegistrationUpdatesState
 * @property {boolean} isConnected a stream carries this registration now
 * @property {RegistrationUpdate | null} latestUpdate
 * @property {RegistrationUpdate[]} updates this run's updates, in order (at most 100)
 * @property {RegistrationStatus | null} status the registration's status (null: not known yet)
 * @property {StageProgress[]} stages this run's stages, in order of appearance
 * @property {number} progress 0-100: completed stages of 3, 100 once final
 * @property {boolean} inProgress a run is going on
 * @property {ConnectionState} connection
 * @property {Error | null} error the last error (cleared when live again)
 * @property {() => void} reconnect close and open the subscription again
 */
export const STAGES_PER_RUN: 3;
export type Action = {
    type: "reset";
} | {
    type: "connection";
    connection: ConnectionState;
} | {
    type: "update";
    update: RegistrationUpdate;
} | {
    type: "snapshot";
    data: RegistrationSnapshot;
} | {
    type: "error";
    error: Error;
};
export type RegistrationUpdate = import("./wire.js").RegistrationUpdate;
export type RegistrationStatus = import("./wire.js").RegistrationStatus;
export type RegistrationSnapshot = import("./wire.js").RegistrationSnapshot;
export type StageStatus = import("./wire.js").StageStatus;
export type ConnectionState = import("./subscription.js").ConnectionState;
export type UseRegistrationUpdatesOptions = {
    /**
     * the registration to follow (none: every one, admins)
     */
    registrationId?: number | null | undefined;
    onUpdate?: ((update: RegistrationUpdate) => void) | undefined;
    onConnected?: (() => void) | undefined;
    onError?: ((error: Error) => void) | undefined;
    /**
     * default true; false: connect on reconnect()
     */
    autoConnect?: boolean | undefined;
};
export type StageProgress = {
    stage: string;
    status: StageStatus;
    message: string;
    timestamp: number;
};
export type RegistrationUpdatesState = {
    /**
     * a stream carries this registration now
     */
    isConnected: boolean;
    latestUpdate: RegistrationUpdate | null;
    /**
     * this run's updates, in order (at most 100)
     */
    updates: RegistrationUpdate[];
    /**
     * the registration's status (null: not known yet)
     */
    status: RegistrationStatus | null;
    /**
     * this run's stages, in order of appearance
     */
    stages: StageProgress[];
    /**
     * 0-100: completed stages of 3, 100 once final
     */
    progress: number;
    /**
     * a run is going on
     */
    inProgress: boolean;
    connection: ConnectionState;
    /**
     * the last error (cleared when live again)
     */
    error: Error | null;
    /**
     * close and open the subscription again
     */
    reconnect: () => void;
};
export type State = {
    connection: ConnectionState;
    latestUpdate: RegistrationUpdate | null;
    updates: RegistrationUpdate[];
    status: RegistrationStatus | null;
    stages: StageProgress[];
    inProgress: boolean;
    final: boolean;
    error: Error | null;
};
