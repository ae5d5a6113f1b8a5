// @ts-check
// @regstream/client: the browser client of regstream's registration update stream.
//
//   import { configure, createRegistrationUpdates } from '@regstream/client';
//   configure({ baseUrl: 'https://regstream.bank', getToken: () => token, tickets: true });  // across origins
//   const updates = createRegistrationUpdates({ registrationId: 42, onUpdate(update) {} });
//   updates.subscribe(() => render(updates.state, updates.latestUpdate));
//   updates.close();
//
// Modules by job: source.js (one EventSource, resume, back-off), plan.js (which streams), coverage.js,
// sequence.js (de-duplication, gaps), coordinator.js (one connection per browser across tabs),
// subscription.js (the page's API), http.js (sign-in, re-reads, stream tickets), wire.js (types).

import { Coordinator, finalListeners } from './coordinator.js';
import { RegistrationUpdates } from './subscription.js';
import { defaultAuthExpired, defaultFetchJson, defaultWhoAmI } from './http.js';

export { RegistrationUpdates } from './subscription.js';
export { AuthRequiredError, HttpError } from './http.js';
export { MAX_IDS_PER_STREAM, STREAM_PATH } from './limits.js';

/** @typedef {import('./wire.js').RegistrationStatus} RegistrationStatus */
/** @typedef {import('./wire.js').StageStatus} StageStatus */
/** @typedef {import('./wire.js').Stage} Stage */
/** @typedef {import('./wire.js').ProcessLogItem} ProcessLogItem */
/** @typedef {import('./wire.js').RegistrationUpdate} RegistrationUpdate */
/** @typedef {import('./wire.js').RegistrationSnapshot} RegistrationSnapshot */
/** @typedef {import('./wire.js').ConnectedFrame} ConnectedFrame */
/** @typedef {import('./wire.js').UpdateFrame} UpdateFrame */
/** @typedef {import('./wire.js').PingFrame} PingFrame */
/** @typedef {import('./wire.js').SnapshotFrame} SnapshotFrame */
/** @typedef {import('./wire.js').AuthFrame} AuthFrame */
/** @typedef {import('./wire.js').StreamFrame} StreamFrame */
/** @typedef {import('./subscription.js').ConnectionState} ConnectionState */
/** @typedef {import('./subscription.js').Snapshot} Snapshot */
/** @typedef {import('./subscription.js').SubscriptionOptions} SubscriptionOptions */
/** @typedef {import('./http.js').ClientConfig} ClientConfig */
/** @typedef {import('./http.js').Me} Me */

/** @type {ClientConfig} */
const config = {
  baseUrl: '',
  getToken: null,
  tickets: false,
  fetchJson: (path) => defaultFetchJson(config, path),
  whoAmI: () => defaultWhoAmI(config),
  authExpired: () => defaultAuthExpired(config),
  onAuthRequired: () => {},
  onLatency: null,
  shareAcrossTabs: true,
  EventSource: null,
};

let coordinator = /** @type {Coordinator | null} */ (null);
function getCoordinator() {
  if (!coordinator) coordinator = new Coordinator(() => config);
  return coordinator;
}

/**
 * Set how the client reaches the service (call before the first subscription; later calls apply
 * to streams opened afterwards).
 * @param {Partial<ClientConfig>} options
 */
export function configure(options) {
  Object.assign(config, options);
  if (config.baseUrl.endsWith('/')) config.baseUrl = config.baseUrl.slice(0, -1);
}

/**
 * Follow one registration, several, or every one (admins).
 * @param {SubscriptionOptions} [options]
 */
export function createRegistrationUpdates(options) {
  return new RegistrationUpdates(getCoordinator, (path) => config.fetchJson(path), options);
}

/**
 * Call `callback(update)` for every final update, in exactly one tab of this browser (the leader,
 * which holds the streams): for notifications that must not pop up once per tab.
 * @param {(update: RegistrationUpdate) => void} callback
 * @returns {() => void} stops the calls
 */
export function onFinalUpdate(callback) {
  finalListeners.add(callback);
  return () => {
    finalListeners.delete(callback);
  };
}

/** This tab's role and the streams it holds (for tests and the console). */
export function debugState() {
  const c = coordinator;
  return {
    role: c ? c.role : 'none',
    streams: c ? [...c.sources.keys()] : [],
    states: c ? { ...c.states } : {},
  };
}
