// Small DOM helpers shared by the pages: text-only rendering (never innerHTML with data),
// labels for stages and statuses, the aria-live announcer, the connection badge.

export const STAGE_LABELS = {
  duplicate_check: 'Duplicate check',
  update_user_info: 'Update user info',
  t24_lookup: 'T24 lookup',
  status_update: 'Status update',
};

export const TERMINAL = new Set(['APPROVED', 'COMPLETED', 'DUPLICATE', 'FAILED']);

export function stageLabel(stage) {
  return STAGE_LABELS[stage] || (stage ? String(stage) : 'Final status');
}

/** h('li', {class: 'x', dataset: {id: 1}}, 'text', childNode, ...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') el.className = value;
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (name === 'text') el.textContent = value;
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function formatTime(ms) {
  if (typeof ms !== 'number') return '';
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

export function formatDateTime(value) {
  if (!value) return '';
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' });
}

export function statusChip(status, inProgress = false) {
  const text = inProgress ? 'IN PROGRESS' : status || '…';
  return h('span', { class: `chip s-${inProgress ? 'running' : String(status || '').toLowerCase()}` }, text);
}

let announceTimer = null;
/** Say something through the page's aria-live="polite" region. */
export function announce(text) {
  const region = document.getElementById('announcer');
  if (!region) return;
  clearTimeout(announceTimer);
  // Clearing first makes screen readers repeat an identical message.
  region.textContent = '';
  announceTimer = setTimeout(() => {
    region.textContent = text;
  }, 50);
}

const BADGE_TEXT = {
  connecting: 'Connecting…',
  live: 'Live',
  reconnecting: 'Reconnecting…',
  polling: 'Refreshing every few seconds',
  closed: 'Offline',
};

export function showConnection(state) {
  const badge = document.getElementById('connection');
  if (!badge) return;
  badge.dataset.state = state;
  badge.textContent = BADGE_TEXT[state] || state;
  badge.title = state === 'live' ? 'Receiving updates live' : 'Not receiving updates right now';
}

export function showError(message) {
  const box = document.getElementById('page-error');
  if (!box) return;
  box.hidden = !message;
  box.textContent = message || '';
}
