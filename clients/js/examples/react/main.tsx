// The seed's registration detail page (app/mobile-banking/registration-requests/[id]/page.tsx),
// rewritten with @regstream/client/react: a Live badge, the stages as they happen, the progress
// and the final status (re-read from the API, as the seed's "auto-refresh on completion").
//
// On the service's origin the session cookie authenticates everything. From another origin, the
// page is given the service's URL and an API token (window.REGSTREAM_EXAMPLE, set by whoever
// serves the page; never in a URL): REST calls send it as a Bearer token and streams open with
// single-use stream tickets (the service lists this origin in REGSTREAM_CORS_ORIGINS).
import { StrictMode, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { configure } from '@regstream/client';
import { useRegistrationUpdates } from '@regstream/client/react';
import type { RegistrationSnapshot, RegistrationUpdate } from '@regstream/client';

declare global {
  interface Window {
    REGSTREAM_EXAMPLE?: { baseUrl: string; token: string };
  }
}

const remote = window.REGSTREAM_EXAMPLE;
if (remote) configure({ baseUrl: remote.baseUrl, getToken: () => remote.token, tickets: true });

function get(path: string): Promise<Response> {
  if (!remote) return fetch(path, { credentials: 'same-origin' });
  return fetch(remote.baseUrl + path, { headers: { Authorization: `Bearer ${remote.token}` } });
}

function RegistrationDetail({ registrationId }: { registrationId: number }) {
  const [registration, setRegistration] = useState<RegistrationSnapshot | null>(null);
  const [realtimeUpdate, setRealtimeUpdate] = useState<string | null>(null);

  const load = () =>
    get(`/api/registrations/${registrationId}`)
      .then((response) => (response.ok ? response.json() : null))
      .then(setRegistration, () => setRegistration(null));
  useEffect(() => {
    void load();
  }, [registrationId]);

  const { isConnected, latestUpdate, updates, stages, status, progress, inProgress, error, reconnect } = useRegistrationUpdates({
    registrationId,
    onUpdate: (update: RegistrationUpdate) => {
      setRealtimeUpdate(update.final ? null : `${update.stage}: ${update.stageStatus} · ${update.message}`);
      if (update.final) void load(); // the final word comes from the API
    },
    onConnected: () => console.log('Connected to updates'),
    onError: (e) => console.warn('Connection error:', e.message),
    autoConnect: true,
  });

  const shown = status ?? registration?.status ?? null;
  const finished = shown !== null && shown !== 'PENDING' && !inProgress;
  const message = latestUpdate?.final ? latestUpdate.message : registration?.result?.message;
  return (
    <main>
      <h1>
        Registration #{registrationId}{' '}
        {isConnected && (
          <span className="badge" id="live">
            <span className="dot" aria-hidden="true" />
            Live
          </span>
        )}
      </h1>
      <p>
        Status: <strong id="status">{shown ?? '…'}</strong>
      </p>
      <div className="progress" role="progressbar" aria-valuemin={0} aria-valuemax={100} aria-valuenow={progress}>
        <div style={{ width: `${progress}%` }} />
      </div>
      {realtimeUpdate && <p id="realtime">{realtimeUpdate}</p>}
      <ol className="stages" id="stages">
        {stages.map((stage) => (
          <li key={stage.stage} data-stage={stage.stage} data-state={stage.status}>
            {stage.stage}: {stage.message}
          </li>
        ))}
      </ol>
      {finished && (
        <p id="result" data-status={shown}>
          {shown}: {message}
        </p>
      )}
      <h2>This run</h2>
      <ol id="updates">
        {updates.map((update) => (
          <li key={update.seq} data-seq={update.seq} data-stage={update.stage ?? ''} data-stage-status={update.stageStatus ?? (update.final ? 'final' : '')}>
            {update.stage ?? update.status}: {update.message}
          </li>
        ))}
      </ol>
      {error && <p role="alert">{error.message}</p>}
      <button type="button" onClick={reconnect}>
        Reconnect
      </button>
    </main>
  );
}

function App() {
  const params = new URLSearchParams(location.search);
  const registrationId = Number(params.get('registrationId') || '1');
  const [shown, setShown] = useState(true);
  return (
    <>
      <button type="button" id="toggle" onClick={() => setShown((value) => !value)}>
        {shown ? 'Unmount' : 'Mount'}
      </button>
      {shown && <RegistrationDetail registrationId={registrationId} />}
    </>
  );
}

createRoot(document.getElementById('root')!).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
