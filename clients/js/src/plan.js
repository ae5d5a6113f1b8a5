// @ts-check
// Which streams to hold for the registrations the tabs want (pure; the coordinator applies it).
//
// Keys: ALL (every registration) or a registration id as a string. A stream's key is ALL or its
// sorted ids joined by commas ("42": a single-registration stream, which starts with a snapshot).
// The unfiltered stream is for admins (or a server without sign-in): an admin gets that one
// stream. Anyone else gets ONE stream with every wanted registration (at most maxIds; the rest is
// polled). With stream tickets (a ticket names one registration or none) each registration gets
// its own stream, at most MAX_TICKET_STREAMS (HTTP/1.1 allows six connections per host).

export const ALL = '*';
export const MAX_TICKET_STREAMS = 4;

/**
 * @param {object} input
 * @param {Iterable<string>} input.keys the wanted registration keys
 * @param {boolean} input.unfilteredAllowed admin, or no sign-in on the server
 * @param {boolean} input.signedIn a person is signed in (a known role)
 * @param {number} input.maxIds the server's limit per filtered stream
 * @param {boolean} [input.singleOnly] stream tickets: one registration (or all) per stream
 * @returns {{streams: string[], unserved: string[]}} stream keys to hold, registration keys to poll
 */
export function planStreams({ keys, unfilteredAllowed, signedIn, maxIds, singleOnly = false }) {
  const wanted = new Set(keys);
  if (wanted.size === 0) return { streams: [], unserved: [] };
  if (unfilteredAllowed && (wanted.has(ALL) || signedIn)) return { streams: [ALL], unserved: [] };
  const ids = [...wanted]
    .filter((key) => key !== ALL)
    .map(Number)
    .filter((id) => Number.isSafeInteger(id) && id > 0)
    .sort((a, b) => a - b);
  const limit = singleOnly ? MAX_TICKET_STREAMS : maxIds;
  if (ids.length > limit && unfilteredAllowed) return { streams: [ALL], unserved: [] };
  const held = ids.slice(0, limit);
  const unserved = ids.slice(limit).map(String);
  if (wanted.has(ALL)) unserved.push(ALL); // the unfiltered stream is for admins: poll
  /** @type {string[]} */
  let streams;
  if (held.length === 0) streams = [];
  else if (singleOnly) streams = held.map(String);
  else streams = [held.join(',')];
  return { streams, unserved };
}

const idSets = new Map();

/** The registration keys a stream key carries (null: every one). @param {string} key */
export function idsOfStreamKey(key) {
  if (key === ALL) return null;
  let ids = idSets.get(key);
  if (!ids) {
    if (idSets.size > 100) idSets.clear();
    ids = new Set(key.split(','));
    idSets.set(key, ids);
  }
  return ids;
}
