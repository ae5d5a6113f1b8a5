// Notifications and sound for runs this browser started.
//
// Started runs are remembered in localStorage (shared by the tabs). Ends are reported by
// stream.js's onFinalUpdate (@regstream/client), which fires in the leader tab only, so one
// notification per run however many tabs are open. Permission is asked only from the
// "Notify me" toggle (a user action); sound is off by default and is a WebAudio beep (no file).

const STARTED_KEY = 'regstream.started';
const NOTIFY_KEY = 'regstream.notify';
const SOUND_KEY = 'regstream.sound';
const MAX_AGE_MS = 24 * 3600 * 1000;

let audio = null;

function readStarted() {
  try {
    const value = JSON.parse(localStorage.getItem(STARTED_KEY) || '{}');
    return value && typeof value === 'object' ? value : {};
  } catch {
    return {};
  }
}

function writeStarted(value) {
  try {
    localStorage.setItem(STARTED_KEY, JSON.stringify(value));
  } catch {
    // storage full or disabled: notifications are best effort
  }
}

export function markStarted(registrationId) {
  const started = readStarted();
  const now = Date.now();
  for (const [id, at] of Object.entries(started)) if (now - at > MAX_AGE_MS) delete started[id];
  started[registrationId] = now;
  writeStarted(started);
}

function takeStarted(registrationId) {
  const started = readStarted();
  if (!(registrationId in started)) return false;
  delete started[registrationId];
  writeStarted(started);
  return true;
}

export function wantsNotifications() {
  return localStorage.getItem(NOTIFY_KEY) === '1';
}

export function wantsSound() {
  return localStorage.getItem(SOUND_KEY) === '1';
}

/** Wire the "Notify me" and "Sound" checkboxes (either may be absent). */
export function bindToggles(notifyBox, soundBox) {
  if (notifyBox) {
    const supported = 'Notification' in window;
    notifyBox.checked = supported && wantsNotifications() && Notification.permission === 'granted';
    notifyBox.disabled = !supported;
    notifyBox.addEventListener('change', async () => {
      if (!notifyBox.checked) {
        localStorage.setItem(NOTIFY_KEY, '0');
        return;
      }
      let permission = Notification.permission;
      if (permission === 'default') permission = await Notification.requestPermission();
      const granted = permission === 'granted';
      notifyBox.checked = granted;
      localStorage.setItem(NOTIFY_KEY, granted ? '1' : '0');
    });
  }
  if (soundBox) {
    soundBox.checked = wantsSound();
    soundBox.addEventListener('change', () => {
      localStorage.setItem(SOUND_KEY, soundBox.checked ? '1' : '0');
      if (soundBox.checked) ensureAudio();
    });
  }
}

function ensureAudio() {
  if (!audio && typeof AudioContext === 'function') audio = new AudioContext();
  if (audio && audio.state === 'suspended') audio.resume().catch(() => {});
  return audio;
}

export function beep(ok = true) {
  const context = ensureAudio();
  if (!context) return;
  const oscillator = context.createOscillator();
  const gain = context.createGain();
  oscillator.frequency.value = ok ? 880 : 330;
  gain.gain.setValueAtTime(0.12, context.currentTime);
  gain.gain.exponentialRampToValueAtTime(0.001, context.currentTime + 0.25);
  oscillator.connect(gain).connect(context.destination);
  oscillator.start();
  oscillator.stop(context.currentTime + 0.25);
}

/** Call with every final update; notifies only for runs this browser started. */
export function runEnded(update) {
  if (!update || !update.final || !takeStarted(update.registrationId)) return false;
  const ok = update.status !== 'FAILED';
  if (wantsNotifications() && 'Notification' in window && Notification.permission === 'granted') {
    try {
      new Notification(`Registration #${update.registrationId}: ${update.status}`, {
        body: update.message || '',
        tag: `regstream-${update.registrationId}`,
      });
    } catch {
      // some platforms only allow notifications from a service worker
    }
  }
  if (wantsSound()) beep(ok);
  return true;
}
