// The registration list: filter, search, pages; rows follow the live stream; validate many.
//
// An admin's page follows every registration (the unfiltered stream); anyone else's follows the
// registrations of the rows it shows (a multi-registration stream, switched over when the page or
// the filter changes). Either way the stream is shared between tabs by the stream module. Filters
// live in the URL so back/forward and bookmarks work.

import { api, ApiError, SignInRequired, newestOnly } from './session.js';
import { initShell } from './shell.js';
import { createRegistrationUpdates, onFinalUpdate } from './stream.js';
import { markStarted, bindToggles, runEnded } from './notify.js';
import { h, stageLabel, formatDateTime, statusChip, announce, showConnection, showError } from './ui.js';

const PAGE_SIZE = 20;
const POST_CONCURRENCY = 2; // leave connection slots for the stream and page loads
const $ = (id) => document.getElementById(id);

const query = new URLSearchParams(location.search);
const view = {
  status: query.get('status') || '',
  q: query.get('q') || '',
  page: Math.max(1, Number(query.get('page')) || 1),
  total: 0,
};
const rows = new Map(); // registrationId → {tr, item}
let followRows = false; // not an admin: follow the rows shown, not every registration
const bulk = { ids: new Set(), done: new Set(), skipped: 0, total: 0 };

function validatable(item) {
  return !item.inProgress && (item.status === 'PENDING' || item.status === 'FAILED');
}

function renderRow(item) {
  const checkbox = h('input', {
    type: 'checkbox',
    class: 'pick',
    'aria-label': `Select registration ${item.id}`,
    disabled: !validatable(item),
  });
  checkbox.addEventListener('change', updateBulkButton);
  const tr = h(
    'tr',
    { dataset: { id: item.id, status: item.inProgress ? 'RUNNING' : item.status } },
    h('td', {}, checkbox),
    h('td', {}, h('a', { href: `/registrations/${item.id}` }, `#${item.id}`)),
    h('td', { class: 'name' }, `${item.firstName} ${item.lastName}`),
    h('td', {}, item.customerNumber || '—'),
    h('td', { class: 'col-status' }, statusChip(item.status, item.inProgress)),
    h('td', { class: 'col-stage' }, item.currentStage ? stageLabel(item.currentStage) : '—'),
    h('td', { class: 'col-updated' }, formatDateTime(item.updatedAt)),
  );
  return tr;
}

function renderTable(items) {
  rows.clear();
  const body = $('rows');
  if (!items.length) {
    body.replaceChildren(h('tr', {}, h('td', { colspan: 7, class: 'muted' }, 'No registrations match.')));
  } else {
    body.replaceChildren(
      ...items.map((item) => {
        const tr = renderRow(item);
        rows.set(item.id, { tr, item });
        return tr;
      }),
    );
  }
  const pages = Math.max(1, Math.ceil(view.total / PAGE_SIZE));
  $('page-info').textContent = `Page ${view.page} of ${pages} · ${view.total} registrations`;
  $('prev').disabled = view.page <= 1;
  $('next').disabled = view.page >= pages;
  $('select-all').checked = false;
  updateBulkButton();
}

// Clear a filter, then type a search: the table shows the newest ask, whichever answers last.
const nextListRequest = newestOnly();

async function load() {
  const signal = nextListRequest();
  const params = new URLSearchParams({ page: String(view.page), pageSize: String(PAGE_SIZE) });
  if (view.status) params.set('status', view.status);
  if (view.q) params.set('q', view.q);
  const shown = new URLSearchParams();
  if (view.status) shown.set('status', view.status);
  if (view.q) shown.set('q', view.q);
  if (view.page > 1) shown.set('page', String(view.page));
  history.replaceState(null, '', shown.toString() ? `?${shown}` : location.pathname);
  try {
    const page = await api(`/api/registrations?${params}`, { signal });
    if (signal.aborted) return; // overtaken after its answer was read
    view.total = page.total;
    for (const item of page.items) updates.setSeq(item.id, item.seq);
    renderTable(page.items);
    if (followRows) updates.follow(page.items.map((item) => item.id));
    showError('');
  } catch (error) {
    if (error instanceof SignInRequired || signal.aborted) return;
    showError(`Could not load registrations: ${error.message}`);
  }
}

function applyUpdate(update) {
  const entry = rows.get(update.registrationId);
  if (update.final) trackBulk(update.registrationId, false);
  if (!entry) return;
  const item = entry.item;
  item.inProgress = !update.final;
  item.status = update.final ? update.status : 'PENDING';
  if (update.stage) item.currentStage = update.stage;
  item.updatedAt = new Date(update.timestamp).toISOString();
  const tr = entry.tr;
  tr.dataset.status = item.inProgress ? 'RUNNING' : item.status;
  tr.querySelector('.col-status').replaceChildren(statusChip(item.status, item.inProgress));
  tr.querySelector('.col-stage').textContent = update.stage
    ? `${stageLabel(update.stage)}: ${update.stageStatus || ''}`
    : item.currentStage
      ? stageLabel(item.currentStage)
      : '—';
  tr.querySelector('.col-updated').textContent = formatDateTime(item.updatedAt);
  const pick = tr.querySelector('.pick');
  pick.disabled = !validatable(item);
  if (pick.disabled) pick.checked = false;
  tr.classList.remove('flash');
  void tr.offsetWidth; // restart the highlight animation
  tr.classList.add('flash');
  updateBulkButton();
}

function selectedIds() {
  return [...document.querySelectorAll('#rows .pick:checked')].map((box) => Number(box.closest('tr').dataset.id));
}

function updateBulkButton() {
  const count = selectedIds().length;
  const button = $('validate-selected');
  button.disabled = count === 0;
  button.textContent = count ? `Validate selected (${count})` : 'Validate selected';
}

function renderBulk() {
  const finished = bulk.done.size;
  const percent = bulk.total ? Math.round((finished / bulk.total) * 100) : 0;
  const bar = $('bulk-progress');
  bar.setAttribute('aria-valuenow', String(percent));
  bar.querySelector('.bar').style.width = `${percent}%`;
  const skipped = bulk.skipped ? ` (${bulk.skipped} not started)` : '';
  $('bulk-text').textContent = `${finished} of ${bulk.total} finished${skipped}`;
  $('bulk-wrap').hidden = bulk.total === 0;
  if (bulk.total && finished === bulk.total) announce(`All ${bulk.total} selected validations finished.`);
}

function trackBulk(registrationId, skipped) {
  if (!bulk.ids.has(registrationId) || bulk.done.has(registrationId)) return;
  bulk.done.add(registrationId);
  if (skipped) bulk.skipped += 1;
  renderBulk();
}

async function validateSelected() {
  const ids = selectedIds();
  if (!ids.length) return;
  bulk.ids = new Set(ids);
  bulk.done = new Set();
  bulk.skipped = 0;
  bulk.total = ids.length;
  renderBulk();
  announce(`Validating ${ids.length} registrations.`);
  for (const box of document.querySelectorAll('#rows .pick:checked')) box.checked = false;
  updateBulkButton();
  const queue = [...ids];
  const worker = async () => {
    while (queue.length) {
      const id = queue.shift();
      markStarted(id);
      try {
        await api(`/api/registrations/${id}/process`, { method: 'POST' });
      } catch (error) {
        if (error instanceof SignInRequired) return;
        trackBulk(id, true);
        if (!(error instanceof ApiError && error.status === 409)) showError(`#${id}: ${error.message}`);
      }
    }
  };
  await Promise.all(Array.from({ length: POST_CONCURRENCY }, worker));
}

const updates = createRegistrationUpdates({
  registrationId: null,
  autoConnect: false,
  onUpdate: applyUpdate,
  onSnapshot: (snapshot) => {
    if (snapshot.resync) load();
    else if (snapshot.data && rows.has(snapshot.data.id)) load();
  },
  onStateChange: showConnection,
});

$('f-status').value = view.status;
$('f-q').value = view.q;
$('filters').addEventListener('submit', (event) => {
  event.preventDefault();
  view.status = $('f-status').value;
  view.q = $('f-q').value.trim();
  view.page = 1;
  load();
});
$('f-status').addEventListener('change', () => $('filters').requestSubmit());
let searchTimer = null;
$('f-q').addEventListener('input', () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => $('filters').requestSubmit(), 300);
});
$('prev').addEventListener('click', () => {
  view.page = Math.max(1, view.page - 1);
  load();
});
$('next').addEventListener('click', () => {
  view.page += 1;
  load();
});
$('select-all').addEventListener('change', (event) => {
  for (const box of document.querySelectorAll('#rows .pick')) if (!box.disabled) box.checked = event.target.checked;
  updateBulkButton();
});
$('validate-selected').addEventListener('click', validateSelected);
onFinalUpdate(runEnded);
bindToggles($('notify-toggle'), null);

(async () => {
  const me = await initShell().catch(() => null);
  // The unfiltered stream is for admins (and servers without sign-in, where me is null).
  followRows = !!me && me.role !== 'admin';
  if (followRows) updates.follow([]);
  await load();
  updates.connect();
})();
