// The admin dashboard: a live feed of every update, counters for the last hour, connected
// stream clients and the delivery latency browsers report (figures + a small SVG chart).

import { api, ApiError, SignInRequired, newestOnly } from './session.js';
import { initShell } from './shell.js';
import { createRegistrationUpdates, onFinalUpdate } from './stream.js';
import { runEnded } from './notify.js';
import { h, stageLabel, formatTime, statusChip, showConnection, showError } from './ui.js';

const FEED_MAX = 200;
const STATS_EVERY_MS = 5000;
const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';

let statsTimer = null;
let statsSoon = null;

function matches(li) {
  const status = $('feed-status').value;
  const stage = $('feed-stage').value;
  if (status && li.dataset.status !== status) return false;
  if (stage && li.dataset.stage !== stage) return false;
  return true;
}

function applyFilters() {
  let visible = 0;
  for (const li of $('feed').children) {
    li.hidden = !matches(li);
    if (!li.hidden) visible += 1;
  }
  $('feed-empty').hidden = visible > 0;
  $('feed-empty').textContent = $('feed').children.length ? 'No updates match the filters.' : 'Waiting for updates…';
}

function addToFeed(update) {
  const stage = update.stage || 'final';
  const li = h(
    'li',
    {
      class: `feed-item${update.final ? ' final' : ''}`,
      dataset: { status: update.status, stage, registrationId: update.registrationId, seq: update.seq ?? '' },
    },
    h('time', { datetime: new Date(update.timestamp).toISOString() }, formatTime(update.timestamp)),
    h('a', { href: `/registrations/${update.registrationId}` }, `#${update.registrationId}`),
    h('span', { class: 'feed-stage' }, update.stage ? `${stageLabel(update.stage)} · ${update.stageStatus || ''}` : 'Final status'),
    statusChip(update.status, !update.final),
    h('span', { class: 'feed-msg' }, update.message === `started: ${update.stage}` ? '' : update.message || ''),
  );
  li.hidden = !matches(li);
  const feed = $('feed');
  feed.prepend(li);
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  applyFilters();
}

function renderChart(points) {
  const svg = $('lat-chart');
  const width = 300;
  const height = 80;
  svg.replaceChildren();
  if (!points.length) {
    const text = document.createElementNS(SVG, 'text');
    text.setAttribute('x', '150');
    text.setAttribute('y', '44');
    text.setAttribute('text-anchor', 'middle');
    text.setAttribute('class', 'chart-empty');
    text.textContent = 'no samples yet';
    svg.append(text);
    return;
  }
  const max = Math.max(10, ...points.map((p) => p.ms));
  const step = points.length > 1 ? width / (points.length - 1) : width;
  const coords = points.map((p, i) => [i * step, height - 4 - (p.ms / max) * (height - 14)]);
  const area = document.createElementNS(SVG, 'path');
  area.setAttribute('d', `M0,${height} ` + coords.map(([x, y]) => `L${x.toFixed(1)},${y.toFixed(1)}`).join(' ') + ` L${width},${height} Z`);
  area.setAttribute('class', 'chart-area');
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('points', coords.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(' '));
  line.setAttribute('class', 'chart-line');
  const label = document.createElementNS(SVG, 'text');
  label.setAttribute('x', '4');
  label.setAttribute('y', '10');
  label.setAttribute('class', 'chart-label');
  label.textContent = `max ${Math.round(max)} ms`;
  svg.append(area, line, label);
}

const ms = (value) => (value == null ? '–' : `${Math.round(value)} ms`);

// Figures are asked for on a timer, after updates and after a snapshot: the counters never go
// back to older figures.
const nextStatsRequest = newestOnly();

async function loadStats() {
  const signal = nextStatsRequest();
  try {
    const stats = await api('/api/stats', { signal });
    if (signal.aborted) return true; // overtaken after its answer was read
    const counters = { inProgress: stats.inProgress, streams: stats.streams, ...stats.byStatus };
    for (const li of document.querySelectorAll('#counters li[data-counter]')) {
      const value = counters[li.dataset.counter];
      li.querySelector('.n').textContent = value == null ? '–' : String(value);
    }
    const latency = stats.latency;
    $('lat-p50').textContent = ms(latency.p50);
    $('lat-p95').textContent = ms(latency.p95);
    $('lat-max').textContent = ms(latency.max);
    $('lat-count').textContent = String(latency.count);
    renderChart(latency.recent || []);
    showError('');
  } catch (error) {
    if (signal.aborted) return true;
    if (error instanceof SignInRequired) return false;
    if (error instanceof ApiError && error.status === 403) {
      showError('The dashboard is for administrators.');
      return false;
    }
    showError(`Could not load the figures: ${error.message}`);
  }
  return true;
}

function statsSoonAfterUpdate() {
  if (statsSoon) return;
  statsSoon = setTimeout(() => {
    statsSoon = null;
    loadStats();
  }, 600);
}

const updates = createRegistrationUpdates({
  registrationId: null,
  autoConnect: false,
  resyncOnGap: false, // the feed shows what arrives; counters come from the API
  onUpdate: (update) => {
    addToFeed(update);
    statsSoonAfterUpdate();
  },
  onSnapshot: () => loadStats(),
  onStateChange: showConnection,
});

onFinalUpdate(runEnded); // this tab may be the one holding the stream for the others
$('feed-status').addEventListener('change', applyFilters);
$('feed-stage').addEventListener('change', applyFilters);
$('feed-clear').addEventListener('click', () => {
  $('feed').replaceChildren();
  applyFilters();
});

(async () => {
  await initShell().catch(() => null);
  if (!(await loadStats())) return;
  statsTimer = setInterval(loadStats, STATS_EVERY_MS);
  updates.connect();
})();
void statsTimer;
