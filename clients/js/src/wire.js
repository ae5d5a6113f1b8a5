// @ts-check
// The wire shapes of the stream (frames and the update messages inside them), as JSDoc types.
// The service publishes the same shapes as a JSON Schema (GET /api/schema/stream.json, also in
// ../schema/stream.json); test/schema-types.ts fails when these types and that schema disagree.

/** @typedef {'PENDING' | 'APPROVED' | 'COMPLETED' | 'DUPLICATE' | 'FAILED'} RegistrationStatus */
/** @typedef {'started' | 'completed' | 'failed'} StageStatus */
/** @typedef {'duplicate_check' | 'update_user_info' | 't24_lookup' | 'status_update'} Stage */

/**
 * One step of a run's process log (a final update's `processLog`, a snapshot's `processLog`).
 * @typedef {object} ProcessLogItem
 * @property {number} seq
 * @property {string | null} stage
 * @property {string} status
 * @property {string} message
 * @property {number} timestamp
 * @property {Record<string, unknown> | null} [details]
 */

/**
 * A published update: a stage's progress (`stage`, `stageStatus`; status PENDING) or the final
 * status (`final: true`, `details`, `processLog`). `seq` counts a registration's updates 1, 2,
 * 3 ... without gaps; `timestamp` is in ms.
 * @typedef {object} RegistrationUpdate
 * @property {number} registrationId
 * @property {RegistrationStatus} status
 * @property {number} timestamp
 * @property {Stage} [stage]
 * @property {StageStatus} [stageStatus]
 * @property {string} message
 * @property {Record<string, unknown>} [details]
 * @property {ProcessLogItem[]} [processLog]
 * @property {number} seq
 * @property {true} [final]
 * @property {string} [eventId]
 */

/**
 * A registration as the API lists it (personal data masked) plus its latest run's process log.
 * @typedef {object} RegistrationSnapshot
 * @property {number} id
 * @property {RegistrationStatus} status
 * @property {string | null} currentStage
 * @property {boolean} inProgress
 * @property {string | null} customerNumber
 * @property {string | null} accountNumber
 * @property {string} firstName
 * @property {string} lastName
 * @property {string} idType
 * @property {string | null} nationalId
 * @property {string | null} phone
 * @property {string | null} email
 * @property {number} seq
 * @property {{message: string, details: Record<string, unknown>} | null} result
 * @property {boolean} retryable
 * @property {string} createdAt
 * @property {string} updatedAt
 * @property {ProcessLogItem[]} processLog
 */

/** @typedef {{type: 'connected', timestamp: number, lastEventId?: string | null}} ConnectedFrame */
/** @typedef {{type: 'update', data: RegistrationUpdate}} UpdateFrame */
/** @typedef {{type: 'ping', timestamp: number}} PingFrame */
/**
 * A registration's state (`data`), or `resync: true`: re-read from the API (the registrations in
 * `data.registrationIds`, or every one the stream follows).
 * @typedef {{type: 'snapshot', timestamp: number, data?: RegistrationSnapshot | {registrationIds: number[]}, resync?: true}} SnapshotFrame
 */
/** @typedef {{type: 'auth', timestamp: number, reason: 'revoked' | 'expired' | 'forbidden'}} AuthFrame */
/** @typedef {ConnectedFrame | UpdateFrame | PingFrame | SnapshotFrame | AuthFrame} StreamFrame */

export {};
