// @ts-check
// When to open a stream again after the browser's EventSource gave up (readyState CLOSED: a 502
// during a deploy, a 401). While it is merely reconnecting, the server's `retry:` paces it.

export const FIRST_RETRY_MS = 5000;
export const MAX_RETRY_MS = 60000;

/**
 * Exponential back-off with ±20 % jitter: 5 s, 10 s, 20 s ... at most 60 s.
 * @param {number} attempt 0 for the first retry
 * @param {() => number} [random]
 */
export function backoff(attempt, random = Math.random) {
  const base = Math.min(MAX_RETRY_MS, FIRST_RETRY_MS * 2 ** Math.min(attempt, 16));
  return Math.round(base * (0.8 + random() * 0.4));
}
