// @ts-check
// @regstream/client/react: the seed's hook.
//
//   const { isConnected, latestUpdate } = useRegistrationUpdates({
//     registrationId: 42, onUpdate, onConnected, onError, autoConnect: true,
//   });
//
// Plus what a page needs: `updates` (this run's, in order, de-duplicated), `status` (the
// registration's), `stages`, `progress` (0-100), `connection`, `error`, `reconnect()`.
//
// One subscription per mounted hook, created in an effect and closed in its clean-up, so
// StrictMode's mount/unmount/mount leaves one subscription and an unmount leaves none (the
// client's coordinator stops with its last subscription: no stream, timer or lock is left).
// Callbacks are read from a ref: passing new functions each render does not reconnect.

import { useCallback, useEffect, useReducer, useRef } from 'react';
import { createRegistrationUpdates } from './index.js';

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

export const STAGES_PER_RUN = 3; // duplicate_check, t24_lookup or update_user_info, status_update
const MAX_UPDATES = 100;

/**
 * @typedef {object} State
 * @property {ConnectionState} connection
 * @property {RegistrationUpdate | null} latestUpdate
 * @property {RegistrationUpdate[]} updates
 * @property {RegistrationStatus | null} status
 * @property {StageProgress[]} stages
 * @property {boolean} inProgress
 * @property {boolean} final
 * @property {Error | null} error
 */

/** @type {State} */
const INITIAL = {
  connection: 'closed',
  latestUpdate: null,
  updates: [],
  status: null,
  stages: [],
  inProgress: false,
  final: false,
  error: null,
};

/**
 * @typedef {{type: 'reset'} | {type: 'connection', connection: ConnectionState} | {type: 'update', update: RegistrationUpdate} | {type: 'snapshot', data: RegistrationSnapshot} | {type: 'error', error: Error}} Action
 */

/**
 * @param {StageProgress[]} stages
 * @param {string} stage
 * @param {StageStatus} status
 * @param {string} message
 * @param {number} timestamp
 */
function upsertStage(stages, stage, status, message, timestamp) {
  const at = stages.findIndex((s) => s.stage === stage);
  const entry = { stage, status, message, timestamp };
  if (at < 0) return [...stages, entry];
  const next = stages.slice();
  next[at] = entry;
  return next;
}

/** @param {import('./wire.js').ProcessLogItem[]} log */
function stagesOfLog(log) {
  /** @type {StageProgress[]} */
  let stages = [];
  for (const entry of log) {
    if (entry.stage) stages = upsertStage(stages, entry.stage, /** @type {StageStatus} */ (entry.status), entry.message, entry.timestamp);
  }
  return stages;
}

/** @param {State} state @param {Action} action @returns {State} */
export function reduce(state, action) {
  switch (action.type) {
    case 'reset':
      return INITIAL;
    case 'connection':
      return { ...state, connection: action.connection, error: action.connection === 'live' ? null : state.error };
    case 'error':
      return { ...state, error: action.error };
    case 'snapshot': {
      const data = action.data;
      return {
        ...state,
        status: data.status,
        inProgress: data.inProgress,
        final: !data.inProgress && data.status !== 'PENDING' && !!data.result,
        stages: stagesOfLog(data.processLog || []),
      };
    }
    case 'update': {
      const update = action.update;
      const newRun = !update.final && (state.final || !state.inProgress);
      const updates = newRun ? [update] : [...state.updates, update].slice(-MAX_UPDATES);
      if (update.final) {
        return {
          ...state,
          latestUpdate: update,
          updates,
          status: update.status,
          inProgress: false,
          final: true,
          stages: Array.isArray(update.processLog) ? stagesOfLog(update.processLog) : state.stages,
        };
      }
      const stages = newRun ? [] : state.stages;
      return {
        ...state,
        latestUpdate: update,
        updates,
        status: update.status,
        inProgress: true,
        final: false,
        stages: update.stage
          ? upsertStage(stages, update.stage, update.stageStatus || 'started', update.message, update.timestamp)
          : stages,
      };
    }
    default:
      return state;
  }
}

/** @param {State} state */
export function progressOf(state) {
  if (state.final) return 100;
  const done = state.stages.filter((s) => s.status === 'completed').length;
  return Math.min(99, Math.round((done / STAGES_PER_RUN) * 100));
}

/**
 * Follow one registration's updates live (or every registration's, for an admin).
 * @param {UseRegistrationUpdatesOptions} [options]
 * @returns {RegistrationUpdatesState}
 */
export function useRegistrationUpdates(options = {}) {
  const { registrationId = null, autoConnect = true } = options;
  const callbacks = useRef(options);
  callbacks.current = options;
  const [state, dispatch] = useReducer(reduce, INITIAL);
  const [attempt, bump] = useReducer((/** @type {number} */ n) => n + 1, 0);

  useEffect(() => {
    if (!autoConnect && attempt === 0) return undefined;
    let current = true;
    dispatch({ type: 'reset' });
    const subscription = createRegistrationUpdates({
      registrationId,
      autoConnect: false,
      onUpdate: (update) => {
        if (!current) return;
        dispatch({ type: 'update', update });
        callbacks.current.onUpdate?.(update);
      },
      onSnapshot: (snapshot) => {
        if (current && !snapshot.resync) dispatch({ type: 'snapshot', data: snapshot.data });
      },
      onConnected: () => {
        if (current) callbacks.current.onConnected?.();
      },
      onError: (error) => {
        if (!current) return;
        dispatch({ type: 'error', error });
        callbacks.current.onError?.(error);
      },
      onStateChange: (connection) => {
        if (current) dispatch({ type: 'connection', connection });
      },
    });
    subscription.connect();
    return () => {
      current = false;
      subscription.close();
    };
  }, [registrationId, autoConnect, attempt]);

  const reconnect = useCallback(() => bump(), []);
  return {
    isConnected: state.connection === 'live',
    latestUpdate: state.latestUpdate,
    updates: state.updates,
    status: state.status,
    stages: state.stages,
    progress: progressOf(state),
    inProgress: state.inProgress,
    connection: state.connection,
    error: state.error,
    reconnect,
  };
}
