/**
 * @param {object} input
 * @param {Iterable<string>} input.keys the wanted registration keys
 * @param {boolean} input.unfilteredAllowed admin, or no sign-in on the server
 * @param {boolean} input.signedIn a person is signed in (a known role)
 * @param {number} input.maxIds the server's limit per filtered stream
 * @param {boolean} [input.singleOnly] stream tickets: one registration (or all) per stream
 * @returns {{streams: string[], unserved: string[]}} stream keys to hold, registration keys to poll
 */
export function planStreams({ keys, unfilteredAllowed, signedIn, maxIds, singleOnly }: {
    keys: Iterable<string>;
    unfilteredAllowed: boolean;
    signedIn: boolean;
    maxIds: number;
    singleOnly?: boolean | undefined;
}): {
    streams: string[];
    unserved: string[];
};
/** The registration keys a stream key carries (null: every one). @param {string} key */
export function idsOfStreamKey(key: string): any;
export const ALL: "*";
export const MAX_TICKET_STREAMS: 4;
