// The registration detail page: applicant (masked by the API), Validate Customer, live stages,
// progress and the final banner.
//
// State comes from three places and is merged by seq: the API (first load, and again on every
// final status), snapshot frames (opening the page mid-run, after a gap or a reconnect) and
// update frames. Every run goes through three stages (duplicate_check, then t24_lookup or
// update_user_info, then status_update), so progress is completed stages / 3; a final status
// is 100 %.

import { api, ApiError, SignInRequired } from './session.js';
import { initShell } from './shell.js';
import { createRegistrationUpdates, onFinalUpdate } from './stream.js';
import { markStarted, bindToggles, runEnded } from './notify.js';
import { h, stageLabel, formatTime, formatDateTime, announce, showConnection, showError, TERMINAL } from './ui.js';

const STAGES_PER_RUN = 3;
const root = document.getElementById('detail');
const registrationId = Number(root.dataset.registrationId);
const $ = (id) => document.getElementById(id);

const state = {
  registration: null,
  status: null,
  inProgress: false,
  stages: [], // [{stage, status, message, timestamp}] in order of appearance
  result: null, // {status, message, details}
  starting: false,
};

function canValidate() {
  return !state.inProgress && !state.starting && (state.status === 'PENDING' || state.status === 'FAILED');
}

function renderApplicant(reg) {
  const values = {
    name: `${reg.firstName} ${reg.lastName}`,
    customerNumber: reg.customerNumber,
    accountNumber: reg.accountNumber,
    idType: reg.idType,
    nationalId: reg.nationalId,
    dateOfBirth: reg.dateOfBirth,
    phone: reg.phone,
    email: reg.email,
    createdAt: formatDateTime(reg.createdAt),
  };
  for (const dd of document.querySelectorAll('#applicant dd[data-field]')) {
    const value = values[dd.dataset.field];
    dd.textContent = value || '—';
  }
  $('reg-name').textContent = `#${reg.id} ${reg.firstName} ${reg.lastName}`;
  document.title = `Registration #${reg.id} · regstream`;
}

function progressPercent() {
  if (state.result) return 100;
  const done = state.stages.filter((s) => s.status === 'completed').length;
  return Math.min(99, Math.round((done / STAGES_PER_RUN) * 100));
}

function renderProgress() {
  const bar = $('progress');
  const percent = state.inProgress || state.result || state.stages.length ? progressPercent() : 0;
  const done = state.stages.filter((s) => s.status === 'completed').length;
  let text;
  if (state.result) text = `Finished: ${state.result.status}`;
  else if (state.inProgress || state.starting) text = `${done} of ${STAGES_PER_RUN} stages done`;
  else text = 'Not started';
  bar.setAttribute('aria-valuenow', String(percent));
  bar.setAttribute('aria-valuetext', `${percent}% · ${text}`);
  bar.dataset.state = state.result ? state.result.status.toLowerCase() : state.inProgress ? 'running' : 'idle';
  bar.querySelector('.bar').style.width = `${percent}%`;
  $('progress-text').textContent = `${percent}% · ${text}`;
}

/** The server's fixed "started: t24_lookup" says nothing the row does not; say it plainly. */
function stageMessage(s) {
  if (s.status === 'started' && (!s.message || s.message === `started: ${s.stage}`)) return 'In progress…';
  return s.message || '';
}

function renderStages() {
  const list = $('stages');
  list.replaceChildren(
    ...state.stages.map((s) =>
      h(
        'li',
        { class: `stage st-${s.status}`, dataset: { stage: s.stage, state: s.status } },
        h('span', { class: 'stage-icon', 'aria-hidden': 'true' }, s.status === 'completed' ? '✓' : s.status === 'failed' ? '✕' : '…'),
        h('span', { class: 'stage-name' }, stageLabel(s.stage)),
        h('span', { class: 'stage-state' }, s.status),
        h('span', { class: 'stage-msg' }, stageMessage(s)),
        h('time', { class: 'stage-time', datetime: new Date(s.timestamp).toISOString() }, formatTime(s.timestamp)),
      ),
    ),
  );
  $('no-stages').hidden = state.stages.length > 0 || state.inProgress || state.starting;
}

function renderResult() {
  const banner = $('result');
  const result = state.result;
  if (!result) {
    banner.hidden = true;
    banner.replaceChildren();
    delete banner.dataset.status;
    return;
  }
  const details = result.details || {};
  const items = [];
  if (typeof details.accountsFound === 'number') {
    items.push(h('li', { dataset: { detail: 'accountsFound' } }, `Accounts found: ${details.accountsFound}`));
  }
  if (Array.isArray(details.updatedFields) && details.updatedFields.length) {
    items.push(h('li', { dataset: { detail: 'updatedFields' } }, `Updated fields: ${details.updatedFields.join(', ')}`));
  }
  if (details.existingUserId != null) {
    items.push(h('li', { dataset: { detail: 'existingUserId' } }, `Existing user: #${details.existingUserId}`));
  }
  if (details.error) items.push(h('li', { dataset: { detail: 'error' } }, `Error code: ${details.error}`));
  if (Array.isArray(details.mismatchedFields) && details.mismatchedFields.length) {
    items.push(h('li', { dataset: { detail: 'mismatchedFields' } }, `Mismatched fields: ${details.mismatchedFields.join(', ')}`));
  }
  if (result.status === 'FAILED') {
    items.push(
      h('li', { dataset: { detail: 'retry' } }, details.retryable ? 'Temporary problem: validate again shortly.' : 'You can validate again after the data is corrected.'),
    );
  }
  banner.dataset.status = result.status;
  banner.replaceChildren(
    h('p', { class: 'banner-title' }, h('strong', { class: 'banner-status' }, result.status), ' ', h('span', { class: 'banner-message' }, result.message || '')),
    items.length ? h('ul', { class: 'banner-details' }, items) : null,
  );
  banner.hidden = false;
}

function renderStatus() {
  const chip = $('status');
  const running = state.inProgress || state.starting;
  chip.textContent = running ? 'IN PROGRESS' : state.status || '…';
  chip.className = `chip s-${running ? 'running' : String(state.status || '').toLowerCase()}`;
  const current = state.stages[state.stages.length - 1];
  $('stage-now').textContent = running && current ? `${stageLabel(current.stage)}: ${current.status}` : '';
  const button = $('validate');
  button.disabled = !canValidate();
  button.textContent = running ? 'Validating…' : state.status === 'FAILED' ? 'Validate Customer again' : 'Validate Customer';
  const hint = $('validate-hint');
  const closed = !running && TERMINAL.has(state.status) && state.status !== 'FAILED';
  hint.hidden = !closed;
  hint.textContent = closed ? `This registration is ${state.status}; it cannot be validated again.` : '';
  root.dataset.status = state.status || '';
  root.dataset.inProgress = String(running);
}

function render() {
  renderStatus();
  renderProgress();
  renderStages();
  renderResult();
}

/** Replace the page state with a registration read from the API or a snapshot frame. */
function applyRegistration(reg) {
  state.registration = reg;
  state.status = reg.status;
  state.inProgress = !!reg.inProgress;
  state.starting = false;
  state.stages = [];
  for (const entry of reg.processLog || []) if (entry.stage) upsertStage(entry.stage, entry.status, entry.message, entry.timestamp);
  state.result = !reg.inProgress && reg.result && TERMINAL.has(reg.status) ? { status: reg.status, ...reg.result } : null;
  renderApplicant(reg);
  render();
}

function upsertStage(stage, status, message, timestamp) {
  const existing = state.stages.find((s) => s.stage === stage);
  if (existing) Object.assign(existing, { status, message, timestamp });
  else state.stages.push({ stage, status, message, timestamp });
}

function applyUpdate(update) {
  if (update.final) {
    state.inProgress = false;
    state.starting = false;
    state.status = update.status;
    if (Array.isArray(update.processLog)) {
      state.stages = [];
      for (const e of update.processLog) if (e.stage) upsertStage(e.stage, e.status, e.message, e.timestamp);
    }
    state.result = { status: update.status, message: update.message, details: update.details || {} };
    render();
    announce(`Validation finished: ${update.status}. ${update.message || ''}`);
    refresh(); // the final word comes from the API (no manual reload)
    return;
  }
  if (!state.inProgress) {
    // A new run (started here, in another tab or by someone else): start from a clean slate.
    state.inProgress = true;
    state.stages = [];
    state.result = null;
    state.status = 'PENDING';
  }
  state.starting = false;
  if (update.stage) upsertStage(update.stage, update.stageStatus || 'started', update.message, update.timestamp);
  render();
  if (update.stage) announce(`${stageLabel(update.stage)} ${update.stageStatus || ''}. ${progressPercent()} percent done.`);
}

async function refresh() {
  try {
    const reg = await api(`/api/registrations/${registrationId}`);
    updates.setSeq(reg.id, reg.seq);
    applyRegistration(reg);
    showError('');
  } catch (error) {
    if (error instanceof SignInRequired) return;
    showError(error instanceof ApiError && error.status === 404 ? `Registration #${registrationId} was not found.` : `Could not load the registration: ${error.message}`);
  }
}

async function validate() {
  if (!canValidate()) return;
  state.starting = true;
  state.stages = [];
  state.result = null;
  $('action-msg').textContent = '';
  render();
  markStarted(registrationId);
  announce('Validation started.');
  try {
    await api(`/api/registrations/${registrationId}/process`, { method: 'POST' });
  } catch (error) {
    if (error instanceof SignInRequired) return;
    state.starting = false;
    $('action-msg').textContent = error.message;
    announce(`Could not start validation: ${error.message}`);
    await refresh();
  }
}

const updates = createRegistrationUpdates({
  registrationId,
  autoConnect: false,
  onUpdate: applyUpdate,
  onSnapshot: (snapshot) => {
    if (snapshot.data) applyRegistration(snapshot.data);
    else refresh();
  },
  onStateChange: (connection) => {
    showConnection(connection);
    if (connection === 'reconnecting') announce('Connection lost, reconnecting.');
  },
  onConnected: () => {},
  onError: () => {},
});

$('validate').addEventListener('click', validate);
onFinalUpdate(runEnded);
bindToggles($('notify-toggle'), $('sound-toggle'));

(async () => {
  const me = await initShell().catch(() => null);
  void me;
  await refresh();
  updates.connect();
})();
