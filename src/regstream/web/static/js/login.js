// Sign in: POST /api/auth/login, then back to where the person was going (same-origin only).
const form = document.getElementById('login-form');
const errorBox = document.getElementById('login-error');

function safeNext() {
  const next = new URLSearchParams(location.search).get('next') || '/registrations';
  // Only paths on this site: "/x" yes, "//evil.example" or "https://…" no.
  if (!next.startsWith('/') || next.startsWith('//') || next.startsWith('/\\')) return '/registrations';
  if (next.startsWith('/login')) return '/registrations';
  return next;
}

function showError(message) {
  errorBox.hidden = !message;
  errorBox.textContent = message || '';
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  showError('');
  const username = form.username.value.trim();
  const password = form.password.value;
  if (!username || !password) {
    showError('Enter your user name and password.');
    return;
  }
  const button = form.querySelector('button[type=submit]');
  button.disabled = true;
  try {
    const response = await fetch('/api/auth/login', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify({ username, password }),
    });
    if (response.ok) {
      location.assign(safeNext());
      return;
    }
    if (response.status === 404) showError('Sign-in is not enabled on this server.');
    else if (response.status === 429) showError('Too many attempts. Wait a minute and try again.');
    else if (response.status === 401 || response.status === 400 || response.status === 422) showError('Wrong user name or password.');
    else showError(`Sign-in failed (HTTP ${response.status}).`);
  } catch {
    showError('The server could not be reached.');
  } finally {
    button.disabled = false;
  }
});
document.getElementById('username').focus();
