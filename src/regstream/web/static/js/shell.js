// The header every page shares: who is signed in, and signing out.
import { api, getMe } from './session.js';

export async function initShell() {
  let me = null;
  try {
    me = await getMe();
  } catch {
    return null; // redirected to /login
  }
  const who = document.getElementById('who');
  if (me && who) {
    document.getElementById('who-name').textContent = me.name || '';
    document.getElementById('who-role').textContent = me.role ? `(${me.role})` : '';
    who.hidden = false;
    document.getElementById('sign-out').addEventListener('click', async () => {
      try {
        await api('/api/auth/logout', { method: 'POST' });
      } catch {
        // signed out or not: go to the sign-in page either way
      }
      location.assign('/login');
    });
  }
  return me;
}
