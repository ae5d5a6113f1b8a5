/** An event id without a snapshot's `~seq`. @param {string | null | undefined} id */
export function positionOf(id: string | null | undefined): string | null;
/**
 * @param {string | null | undefined} id
 * @returns {{epoch: string, ms: number, n: number} | null}
 */
export function parseEventId(id: string | null | undefined): {
    epoch: string;
    ms: number;
    n: number;
} | null;
/**
 * The later of two history positions; `b` when they cannot be compared (another epoch).
 * @param {string | null} a
 * @param {string | null} b
 */
export function laterId(a: string | null, b: string | null): string | null;
