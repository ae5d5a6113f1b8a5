// Who is signed in, and fetch() with the rules every page shares:
// - GET /api/auth/me: 200 → {name, role, csrfToken}; 401 → go to /login; 404 → sign-in is not
//   enabled on this server (the API is open), carry on without a person;
// - state-changing requests send X-CSRF-Token when /api/auth/me gave one;
// - any 401 from the API means "sign in again": go to /login?next=<this page>.

const ME_PATH = '/api/auth/me';
let mePromise = null;

export class SignInRequired extends Error {}

export function loginUrl() {
  const next = location.pathname + location.search;
  return '/login?next=' + encodeURIComponent(next);
}

export function goToLogin() {
  if (location.pathname === '/login') return;
  location.assign(loginUrl());
}

/** The signed-in person, null when sign-in is not enabled. Redirects to /login on 401. */
export function getMe() {
  if (!mePromise) {
    mePromise = fetch(ME_PATH, { credentials: 'same-origin', headers: { Accept: 'application/json' } })
      .then(async (response) => {
        if (response.status === 401) {
          goToLogin();
          throw new SignInRequired('sign in required');
        }
        if (!response.ok) return null;
        const body = await response.json();
        return {
          name: body.name ?? body.username ?? null,
          role: body.role ?? null,
          csrfToken: body.csrfToken ?? body.csrf_token ?? null,
        };
      })
      .catch((error) => {
        if (error instanceof SignInRequired) throw error;
        return null; // network trouble: the page's own calls will say so
      });
  }
  return mePromise;
}

/** Ask the server whether our credentials still hold (true when /api/auth/me answers 401). */
export async function signInExpired() {
  try {
    const response = await fetch(ME_PATH, { credentials: 'same-origin', cache: 'no-store' });
    return response.status === 401;
  } catch {
    return false;
  }
}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// For requests repeated as the page changes (a list after each filter, the figures on a timer):
// answers can arrive out of order, so each new request cancels the one before it. Call the
// returned function for each request's signal; a request whose signal is aborted was overtaken.
export function newestOnly() {
  let current = null;
  return () => {
    current?.abort();
    current = new AbortController();
    return current.signal;
  };
}

/** fetch() JSON from our API. Throws ApiError on non-2xx (after redirecting on 401). */
export async function api(path, { method = 'GET', body, signal } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && method !== 'HEAD') {
    const me = await getMe().catch(() => null);
    if (me && me.csrfToken) headers['X-CSRF-Token'] = me.csrfToken;
  }
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
    signal,
  });
  if (response.status === 401) {
    goToLogin();
    throw new SignInRequired('sign in required');
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text.slice(0, 200) };
    }
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}
