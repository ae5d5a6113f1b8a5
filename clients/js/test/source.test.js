// StreamSource: resume ids, the browser's own reconnect vs ours, back-off, ticket refresh.
// EventSource is a scripted stand-in (Node has none); the ticket server is real HTTP.
import { test, mock } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { StreamSource } from '../src/source.js';
import { FIRST_RETRY_MS, MAX_RETRY_MS, backoff } from '../src/backoff.js';
import { AuthRequiredError, streamUrl } from '../src/http.js';

class ScriptedEventSource {
  static opened = [];
  constructor(url, init) {
    this.url = url;
    this.init = init;
    this.readyState = 0;
    this.closed = false;
    ScriptedEventSource.opened.push(this);
  }
  open() {
    this.readyState = 1;
    this.onopen();
  }
  message(data, lastEventId = '') {
    this.onmessage({ data: JSON.stringify(data), lastEventId });
  }
  fail(readyState) {
    this.readyState = readyState;
    this.onerror();
  }
  close() {
    this.closed = true;
    this.readyState = 2;
  }
}

function source({ singleUseUrls = false, expired = false, urlFor } = {}) {
  ScriptedEventSource.opened = [];
  const frames = [];
  const states = [];
  let n = 0;
  const src = new StreamSource('42', {
    env: {
      urlFor: urlFor || (async (key, last) => `/s?registrationId=${key}&n=${n++}${last ? `&lastEventId=${last}` : ''}`),
      authExpired: async () => expired,
      EventSource: ScriptedEventSource,
      withCredentials: false,
      singleUseUrls,
      random: () => 0.5,
    },
    onFrame: (key, frame, id) => frames.push([frame.type, id]),
    onState: (key, state) => states.push(state),
  });
  return { src, frames, states };
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

test('back-off: 5 s doubling to 60 s, ±20 % jitter', () => {
  assert.equal(backoff(0, () => 0.5), FIRST_RETRY_MS);
  assert.equal(backoff(1, () => 0.5), 2 * FIRST_RETRY_MS);
  assert.equal(backoff(10, () => 0.5), MAX_RETRY_MS);
  assert.equal(backoff(0, () => 0), FIRST_RETRY_MS * 0.8);
  assert.equal(backoff(0, () => 1), FIRST_RETRY_MS * 1.2);
  assert.equal(backoff(1000, () => 0.5), MAX_RETRY_MS);
});

test('a fresh stream resumes from connected.lastEventId, then from update ids', async () => {
  const { src, frames } = source();
  await src.open();
  const es = ScriptedEventSource.opened[0];
  es.open();
  es.message({ type: 'connected', timestamp: 1, lastEventId: '1_5-0' });
  assert.equal(src.lastEventId, '1_5-0');
  es.message({ type: 'update', data: { registrationId: 42, seq: 1 } }, '1_6-0');
  assert.equal(src.lastEventId, '1_6-0');
  assert.deepEqual(frames, [['connected', '1_5-0'], ['update', '1_6-0']]);
  src.close();
});

test('while the browser reconnects by itself we do not; once it gave up we back off', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { src, states } = source();
  await src.open();
  const first = ScriptedEventSource.opened[0];
  first.open();
  first.message({ type: 'update', data: { registrationId: 42, seq: 1 } }, '1_6-0');
  first.fail(0); // CONNECTING: the browser's own retry
  await settle();
  assert.equal(ScriptedEventSource.opened.length, 1);
  first.fail(2); // CLOSED: given up
  await settle();
  assert.equal(first.closed, true);
  t.mock.timers.tick(FIRST_RETRY_MS - 1);
  await settle();
  assert.equal(ScriptedEventSource.opened.length, 1);
  t.mock.timers.tick(1);
  await settle();
  assert.equal(ScriptedEventSource.opened.length, 2);
  assert.match(ScriptedEventSource.opened[1].url, /lastEventId=1_6-0/);
  ScriptedEventSource.opened[1].fail(2); // the next attempt fails too: twice as long
  await settle();
  t.mock.timers.tick(2 * FIRST_RETRY_MS - 1);
  await settle();
  assert.equal(ScriptedEventSource.opened.length, 2);
  t.mock.timers.tick(1);
  await settle();
  assert.equal(ScriptedEventSource.opened.length, 3);
  ScriptedEventSource.opened[2].open(); // success resets the back-off
  assert.equal(src.attempt, 0);
  assert.deepEqual(states, ['open', 'reconnecting', 'open']);
  src.close();
});

test('credentials gone: state auth, no retry', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { src, states } = source({ expired: true });
  await src.open();
  ScriptedEventSource.opened[0].fail(2);
  await settle();
  assert.equal(states.at(-1), 'auth');
  t.mock.timers.tick(MAX_RETRY_MS * 2);
  await settle();
  assert.equal(ScriptedEventSource.opened.length, 1);
  src.close();
});

test('close() clears the retry timer (nothing leaks)', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { src } = source();
  await src.open();
  ScriptedEventSource.opened[0].fail(2);
  await settle();
  assert.notEqual(src.timer, null);
  src.close();
  assert.equal(src.timer, null);
  t.mock.timers.tick(MAX_RETRY_MS * 2);
  await settle();
  assert.equal(ScriptedEventSource.opened.length, 1);
});

// --- tickets against a real HTTP server -----------------------------------------------------

async function ticketServer(t, answer) {
  const requests = [];
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk) => (body += chunk));
    req.on('end', () => {
      requests.push({ method: req.method, url: req.url, auth: req.headers.authorization, body: body ? JSON.parse(body) : null });
      const [status, json] = answer(requests.length);
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(json));
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => server.close());
  return { baseUrl: `http://127.0.0.1:${server.address().port}`, requests };
}

function ticketConfig(baseUrl) {
  return { baseUrl, tickets: true, getToken: () => 'rst_test' };
}

test('tickets: one minted per (re)connect, with the token, resuming by lastEventId', async (t) => {
  const { baseUrl, requests } = await ticketServer(t, (n) => [
    201, { ticket: `rstk_${n}`, expiresIn: 60, streamUrl: `/api/registrations/updates/stream?ticket=rstk_${n}&registrationId=42` },
  ]);
  const config = ticketConfig(baseUrl);
  const first = await streamUrl(config, '42', null);
  const second = await streamUrl(config, '42', '1_6-0');
  assert.equal(first, `${baseUrl}/api/registrations/updates/stream?ticket=rstk_1&registrationId=42`);
  assert.equal(second, `${baseUrl}/api/registrations/updates/stream?ticket=rstk_2&registrationId=42&lastEventId=1_6-0`);
  assert.deepEqual(requests.map((r) => [r.method, r.url, r.auth, r.body]), [
    ['POST', '/api/auth/stream-ticket', 'Bearer rst_test', { registrationId: 42 }],
    ['POST', '/api/auth/stream-ticket', 'Bearer rst_test', { registrationId: 42 }],
  ]);
  const all = await streamUrl(config, '*', null);
  assert.match(all, /ticket=rstk_3/);
  assert.deepEqual(requests[2].body, {});
});

test('tickets: a stream error reopens with a fresh ticket (a spent one would be refused)', async (t) => {
  const { baseUrl, requests } = await ticketServer(t, (n) => [
    201, { ticket: `rstk_${n}`, expiresIn: 60, streamUrl: `/api/registrations/updates/stream?ticket=rstk_${n}&registrationId=42` },
  ]);
  const config = ticketConfig(baseUrl);
  const { src } = source({ singleUseUrls: true, urlFor: (key, last) => streamUrl(config, key, last) });
  await src.open();
  const first = ScriptedEventSource.opened[0];
  first.open();
  first.message({ type: 'update', data: { registrationId: 42, seq: 3 } }, '1_7-0');
  t.mock.timers.enable({ apis: ['setTimeout'] });
  first.fail(0); // the browser would retry with the same (spent) ticket: we close it instead
  await settle();
  assert.equal(first.closed, true);
  t.mock.timers.tick(999); // about the server's retry hint (1 s ±50 %), not the 5 s back-off
  await settle();
  assert.equal(requests.length, 1);
  t.mock.timers.tick(1);
  // the ticket request is real HTTP: wait for it, bounded
  for (let i = 0; i < 1000 && ScriptedEventSource.opened.length < 2; i++) await settle();
  assert.equal(ScriptedEventSource.opened.length, 2);
  assert.match(ScriptedEventSource.opened[1].url, /ticket=rstk_2&registrationId=42&lastEventId=1_7-0$/);
  assert.equal(requests.length, 2);
  src.close();
});

test('tickets: a refused ticket (401) means sign in again', async (t) => {
  const { baseUrl } = await ticketServer(t, () => [401, { message: 'sign in' }]);
  const config = ticketConfig(baseUrl);
  await assert.rejects(streamUrl(config, '42', null), AuthRequiredError);
  const { src, states } = source({ singleUseUrls: true, urlFor: (key, last) => streamUrl(config, key, last) });
  await src.open();
  assert.deepEqual(states, ['auth']);
  assert.equal(ScriptedEventSource.opened.length, 0);
  src.close();
});
