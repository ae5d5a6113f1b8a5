/**
 * Exponential back-off with ±20 % jitter: 5 s, 10 s, 20 s ... at most 60 s.
 * @param {number} attempt 0 for the first retry
 * @param {() => number} [random]
 */
export function backoff(attempt: number, random?: () => number): number;
export const FIRST_RETRY_MS: 5000;
export const MAX_RETRY_MS: 60000;
