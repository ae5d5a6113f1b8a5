// The package's wire types (src/wire.js, published in types/) against the service's schema
// (schema/stream.json, turned into TypeScript by scripts/check-schema.mjs): each pair must be
// assignable both ways and, for objects, have the same keys (TypeScript lets a type with an
// extra optional property be assigned to one without it, so keys are compared too).
import type * as S from '../../.check/stream-schema';
import type * as P from '@regstream/client';

type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type SameKeys<A, B> = Same<keyof A, keyof B>;

export const agree: {
  frame: Same<S.StreamFrame, P.StreamFrame>;
  connected: Same<S.ConnectedFrame, P.ConnectedFrame>;
  connectedKeys: SameKeys<S.ConnectedFrame, P.ConnectedFrame>;
  update: Same<S.UpdateFrame, P.UpdateFrame>;
  updateKeys: SameKeys<S.UpdateFrame, P.UpdateFrame>;
  ping: Same<S.PingFrame, P.PingFrame>;
  pingKeys: SameKeys<S.PingFrame, P.PingFrame>;
  snapshot: Same<S.SnapshotFrame, P.SnapshotFrame>;
  snapshotKeys: SameKeys<S.SnapshotFrame, P.SnapshotFrame>;
  auth: Same<S.AuthFrame, P.AuthFrame>;
  authKeys: SameKeys<S.AuthFrame, P.AuthFrame>;
  message: Same<S.RegistrationUpdate, P.RegistrationUpdate>;
  messageKeys: SameKeys<S.RegistrationUpdate, P.RegistrationUpdate>;
  registration: Same<S.RegistrationSnapshot, P.RegistrationSnapshot>;
  registrationKeys: SameKeys<S.RegistrationSnapshot, P.RegistrationSnapshot>;
  logItem: Same<S.ProcessLogItem, P.ProcessLogItem>;
  logItemKeys: SameKeys<S.ProcessLogItem, P.ProcessLogItem>;
  status: Same<S.RegistrationStatus, P.RegistrationStatus>;
  stageStatus: Same<S.StageStatus, P.StageStatus>;
} = {
  frame: true,
  connected: true,
  connectedKeys: true,
  update: true,
  updateKeys: true,
  ping: true,
  pingKeys: true,
  snapshot: true,
  snapshotKeys: true,
  auth: true,
  authKeys: true,
  message: true,
  messageKeys: true,
  registration: true,
  registrationKeys: true,
  logItem: true,
  logItemKeys: true,
  status: true,
  stageStatus: true,
};
