// @ts-check
// How the client talks to the service besides the stream: who is signed in, re-reading a
// registration, stream tickets. Every piece can be replaced through configure() (the service's
// own pages pass their session helpers; a cross-origin app passes baseUrl, getToken, tickets).

import { ALL } from './plan.js';
import { STREAM_PATH } from './limits.js';

export class AuthRequiredError extends Error {
  /** @param {string} [reason] */
  constructor(reason = 'expired') {
    super(`sign in required (${reason})`);
    this.name = 'AuthRequiredError';
    this.reason = reason;
  }
}

export class HttpError extends Error {
  /** @param {number} status */
  constructor(status) {
    super(`HTTP ${status}`);
    this.name = 'HttpError';
    this.status = status;
  }
}

/**
 * @typedef {object} Me
 * @property {string | null} role
 */

/**
 * @typedef {object} ClientConfig
 * @property {string} baseUrl the service's origin ('' = this page's)
 * @property {(() => string | null | Promise<string | null>) | null} getToken an API token (Bearer) for REST calls and tickets
 * @property {boolean} tickets open streams with single-use stream tickets (needed across origins or with a token)
 * @property {(path: string) => Promise<any>} fetchJson GET a JSON document of the API
 * @property {() => Promise<Me | null>} whoAmI the signed-in person (null: the server has no sign-in)
 * @property {() => Promise<boolean>} authExpired whether the credentials are gone (after a stream gave up)
 * @property {(reason: string) => void} onAuthRequired called once per tab when the credentials are gone
 * @property {((latencyMs: number) => void) | null} onLatency the leader tab: now - update.timestamp per delivered update
 * @property {boolean} shareAcrossTabs one connection per browser (Web Locks + BroadcastChannel)
 * @property {typeof EventSource | null} EventSource
 */

/** @param {ClientConfig} config */
async function headers(config) {
  /** @type {Record<string, string>} */
  const result = { Accept: 'application/json' };
  const token = config.getToken ? await config.getToken() : null;
  if (token) result.Authorization = `Bearer ${token}`;
  return result;
}

/** @param {ClientConfig} config */
function credentials(config) {
  return config.baseUrl && !config.getToken ? 'include' : 'same-origin';
}

/** @param {ClientConfig} config @param {string} path */
export async function defaultFetchJson(config, path) {
  const response = await fetch(config.baseUrl + path, {
    headers: await headers(config),
    credentials: credentials(config),
    cache: 'no-store',
  });
  if (response.status === 401) throw new AuthRequiredError();
  if (!response.ok) throw new HttpError(response.status);
  return response.json();
}

/** @param {ClientConfig} config @returns {Promise<Me | null>} */
export async function defaultWhoAmI(config) {
  try {
    const body = await config.fetchJson('/api/auth/me');
    return { role: body && typeof body.role === 'string' ? body.role : null };
  } catch (error) {
    if (error instanceof HttpError && error.status === 404) return null; // no sign-in: open API
    if (error instanceof AuthRequiredError) throw error;
    return { role: null }; // network trouble: assume a non-admin (filtered streams work for all)
  }
}

/** @param {ClientConfig} config */
export async function defaultAuthExpired(config) {
  try {
    await config.fetchJson('/api/auth/me');
    return false;
  } catch (error) {
    return error instanceof AuthRequiredError;
  }
}

/**
 * The URL of a stream: the cookie's own (same origin) or a fresh single-use ticket's.
 * @param {ClientConfig} config
 * @param {string} key a stream key (ALL, or registration ids joined by commas)
 * @param {string | null} lastEventId
 */
export async function streamUrl(config, key, lastEventId) {
  const params = new URLSearchParams();
  let path = STREAM_PATH;
  if (config.tickets) {
    const ticket = await mintTicket(config, key === ALL ? null : Number(key));
    const url = new URL(ticket.streamUrl, 'http://x');
    path = url.pathname;
    for (const [name, value] of url.searchParams) params.set(name, value);
  } else if (key !== ALL) {
    params.set('registrationId', key);
  }
  if (lastEventId) params.set('lastEventId', lastEventId);
  const query = params.toString();
  return config.baseUrl + (query ? `${path}?${query}` : path);
}

/**
 * POST /api/auth/stream-ticket: a single-use ticket for one stream (one registration, or all for
 * an admin); valid about a minute, so one is minted right before each (re)connect.
 * @param {ClientConfig} config
 * @param {number | null} registrationId
 * @returns {Promise<{ticket: string, streamUrl: string, expiresIn: number}>}
 */
export async function mintTicket(config, registrationId) {
  const response = await fetch(`${config.baseUrl}/api/auth/stream-ticket`, {
    method: 'POST',
    headers: { ...(await headers(config)), 'Content-Type': 'application/json' },
    credentials: credentials(config),
    body: JSON.stringify(registrationId == null ? {} : { registrationId }),
  });
  if (response.status === 401) throw new AuthRequiredError();
  if (!response.ok) throw new HttpError(response.status);
  return response.json();
}
