// @ts-check
// Stream positions. Every update carries `id: <epoch>_<ms>-<n>` (global order of the channel's
// history); a snapshot's id is `<position>~<seq>` (its floor belongs to one registration).

/** An event id without a snapshot's `~seq`. @param {string | null | undefined} id */
export function positionOf(id) {
  return id ? String(id).split('~')[0] : null;
}

/**
 * @param {string | null | undefined} id
 * @returns {{epoch: string, ms: number, n: number} | null}
 */
export function parseEventId(id) {
  const match = /^(\d+)_(\d+)-(\d+)$/.exec(positionOf(id) || '');
  return match ? { epoch: match[1], ms: Number(match[2]), n: Number(match[3]) } : null;
}

/**
 * The later of two history positions; `b` when they cannot be compared (another epoch).
 * @param {string | null} a
 * @param {string | null} b
 */
export function laterId(a, b) {
  if (!a) return b;
  if (!b) return a;
  const pa = parseEventId(a);
  const pb = parseEventId(b);
  if (!pa || !pb || pa.epoch !== pb.epoch) return b;
  return pa.ms > pb.ms || (pa.ms === pb.ms && pa.n > pb.n) ? a : b;
}
