// The audit log: a read-only table of GET /api/audit (newest first).
import { api, ApiError, SignInRequired } from './session.js';
import { initShell } from './shell.js';
import { h, formatDateTime, showError } from './ui.js';

const pick = (entry, ...names) => {
  for (const name of names) if (entry[name] !== undefined && entry[name] !== null) return entry[name];
  return '';
};

function renderRows(entries) {
  const body = document.getElementById('audit-rows');
  if (!entries.length) {
    body.replaceChildren(h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No audit entries yet.')));
    return;
  }
  body.replaceChildren(
    ...entries.map((entry) => {
      const when = pick(entry, 'at', 'timestamp', 'createdAt', 'time');
      return h(
        'tr',
        {},
        h('td', {}, typeof when === 'number' ? formatDateTime(new Date(when)) : formatDateTime(when)),
        h('td', {}, String(pick(entry, 'actor', 'user', 'username', 'who'))),
        h('td', {}, String(pick(entry, 'action', 'event'))),
        h('td', {}, String(pick(entry, 'target', 'registrationId', 'subject'))),
        h('td', {}, String(pick(entry, 'outcome', 'result', 'status'))),
      );
    }),
  );
}

(async () => {
  await initShell().catch(() => null);
  try {
    const data = await api('/api/audit');
    renderRows(Array.isArray(data) ? data : (data && data.items) || []);
  } catch (error) {
    if (error instanceof SignInRequired) return;
    renderRows([]);
    if (error instanceof ApiError && error.status === 404) showError('The audit log is not available on this server.');
    else if (error instanceof ApiError && error.status === 403) showError('Only administrators can read the audit log.');
    else showError(`Could not load the audit log: ${error.message}`);
  }
})();
