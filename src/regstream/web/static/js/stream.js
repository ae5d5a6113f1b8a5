// stream.js: the pages' stream client is the @regstream/client package (clients/js, served as
// /static/client/): this module only configures it for the pages (the session's fetch and sign-in
// rules from session.js, delivery-latency reports) and re-exports what the pages use.
//
//   import { createRegistrationUpdates, onFinalUpdate } from './stream.js';
//
// See clients/js/README.md for the subscription API, the states and the frames.

import { configure, createRegistrationUpdates, onFinalUpdate, debugState } from '../client/index.js';
import { api, getMe, goToLogin, signInExpired } from './session.js';

const LATENCY_FLUSH_MS = 5000;
const LATENCY_MAX_BATCH = 200;

// Latency: the leader tab (the one holding the streams) reports now - update.timestamp (ms) in
// batches, at most every 5 s, and what is left when the page goes away.
const samples = [];
let flushTimer = null;

function flushLatency(beacon = false) {
  clearTimeout(flushTimer);
  flushTimer = null;
  if (samples.length === 0) return;
  const batch = samples.splice(0, LATENCY_MAX_BATCH).map((ms) => Math.max(0, ms));
  if (beacon) {
    // A keepalive fetch outlives the page (sendBeacon cannot send the CSRF header the session
    // cookie needs).
    getMe()
      .catch(() => null)
      .then((me) => {
        const headers = { 'Content-Type': 'application/json' };
        if (me && me.csrfToken) headers['X-CSRF-Token'] = me.csrfToken;
        return fetch('/api/metrics/latency', {
          method: 'POST', headers, body: JSON.stringify({ samples: batch }), keepalive: true, credentials: 'same-origin',
        });
      })
      .catch(() => {});
    return;
  }
  api('/api/metrics/latency', { method: 'POST', body: { samples: batch } }).catch(() => {});
}

configure({
  fetchJson: (path) => api(path),
  whoAmI: () => getMe(),
  authExpired: () => signInExpired(),
  onAuthRequired: () => goToLogin(),
  onLatency: (ms) => {
    if (samples.length < LATENCY_MAX_BATCH * 5) samples.push(ms);
    if (!flushTimer) flushTimer = setTimeout(() => flushLatency(), LATENCY_FLUSH_MS);
  },
});
window.addEventListener('pagehide', () => flushLatency(true));
// Back from the back/forward cache: the client reopens its streams, but a page's own state may be
// old; these pages are cheap to load again.
window.addEventListener('pageshow', (event) => {
  if (event.persisted) location.reload();
});

/** Debug view for tests and the console: this tab's role and the streams it holds. */
window.__regstream = {
  get role() {
    return debugState().role;
  },
  get streams() {
    return debugState().streams;
  },
  get states() {
    return debugState().states;
  },
};

export { createRegistrationUpdates, onFinalUpdate };
