/** Registrations one filtered stream may follow (the server's limit). */
export const MAX_IDS_PER_STREAM: 200;
/** The stream's path on the service. */
export const STREAM_PATH: "/api/registrations/updates/stream";
