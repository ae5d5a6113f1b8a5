export type RegistrationStatus = "PENDING" | "APPROVED" | "COMPLETED" | "DUPLICATE" | "FAILED";
export type StageStatus = "started" | "completed" | "failed";
export type Stage = "duplicate_check" | "update_user_info" | "t24_lookup" | "status_update";
/**
 * One step of a run's process log (a final update's `processLog`, a snapshot's `processLog`).
 */
export type ProcessLogItem = {
    seq: number;
    stage: string | null;
    status: string;
    message: string;
    timestamp: number;
    details?: Record<string, unknown> | null | undefined;
};
/**
 * A published update: a stage's progress (`stage`, `stageStatus`; status PENDING) or the final
 * status (`final: true`, `details`, `processLog`). `seq` counts a registration's updates 1, 2,
 * 3 ... without gaps; `timestamp` is in ms.
 */
export type RegistrationUpdate = {
    registrationId: number;
    status: RegistrationStatus;
    timestamp: number;
    stage?: Stage | undefined;
    stageStatus?: StageStatus | undefined;
    message: string;
    details?: Record<string, unknown> | undefined;
    processLog?: ProcessLogItem[] | undefined;
    seq: number;
    final?: true | undefined;
    eventId?: string | undefined;
};
/**
 * A registration as the API lists it (personal data masked) plus its latest run's process log.
 */
export type RegistrationSnapshot = {
    id: number;
    status: RegistrationStatus;
    currentStage: string | null;
    inProgress: boolean;
    customerNumber: string | null;
    accountNumber: string | null;
    firstName: string;
    lastName: string;
    idType: string;
    nationalId: string | null;
    phone: string | null;
    email: string | null;
    seq: number;
    result: {
        message: string;
        details: Record<string, unknown>;
    } | null;
    retryable: boolean;
    createdAt: string;
    updatedAt: string;
    processLog: ProcessLogItem[];
};
export type ConnectedFrame = {
    type: "connected";
    timestamp: number;
    lastEventId?: string | null;
};
export type UpdateFrame = {
    type: "update";
    data: RegistrationUpdate;
};
export type PingFrame = {
    type: "ping";
    timestamp: number;
};
/**
 * A registration's state (`data`), or `resync: true`: re-read from the API (the registrations in
 * `data.registrationIds`, or every one the stream follows).
 */
export type SnapshotFrame = {
    type: "snapshot";
    timestamp: number;
    data?: RegistrationSnapshot | {
        registrationIds: number[];
    };
    resync?: true;
};
export type AuthFrame = {
    type: "auth";
    timestamp: number;
    reason: "revoked" | "expired" | "forbidden";
};
export type StreamFrame = ConnectedFrame | UpdateFrame | PingFrame | SnapshotFrame | AuthFrame;
