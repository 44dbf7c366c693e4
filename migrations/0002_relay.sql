-- What the relay needs beside the SPEC columns. Nothing here changes what a producer
-- writes: new columns are nullable, the trigger only wakes the relay up.

-- Retry schedule: NULL = due now. Set only while a rejected row waits for its next try.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS next_attempt_at TIMESTAMPTZ NULL;
-- A FAILED row an operator gave up on (`outbox-relay discard`): kept for audit, no longer
-- holds back its aggregate.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS discarded_at TIMESTAMPTZ NULL;

-- Claiming walks pending rows in id order.
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON outbox (id) WHERE status = 'PENDING';
-- Rows that hold back the later rows of their aggregate: FAILED ones and those waiting
-- for a retry. Normally tiny, probed once per claimed row.
CREATE INDEX IF NOT EXISTS outbox_blockers_idx ON outbox (aggregate_type, aggregate_id, id)
    WHERE status = 'FAILED' OR next_attempt_at IS NOT NULL;
-- Retention deletes old PROCESSED rows in bounded batches.
CREATE INDEX IF NOT EXISTS outbox_processed_idx ON outbox (processed_at) WHERE status = 'PROCESSED';

-- Wake-up: one NOTIFY per inserting statement (not per row); the channel is per table.
-- Polling on status stays on as the safety net for notifications lost while reconnecting.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relay_wake_' || TG_RELID::text, '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS outbox_notify_trg ON outbox;
CREATE TRIGGER outbox_notify_trg AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Work sharing: aggregates hash into 256 partitions; a relay instance publishes only the
-- rows of partitions it holds a live lease on, so one aggregate has one publisher at a time.
CREATE TABLE IF NOT EXISTS outbox_relay_leases (
    partition   INT         PRIMARY KEY,
    owner       TEXT        NULL,
    lease_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
INSERT INTO outbox_relay_leases (partition)
    SELECT g FROM generate_series(0, 255) AS g
    ON CONFLICT DO NOTHING;

-- Live relay instances (heartbeats), so each can take its fair share of partitions.
CREATE TABLE IF NOT EXISTS outbox_relay_members (
    instance    TEXT        PRIMARY KEY,
    alive_until TIMESTAMPTZ NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Schema marker the relay checks at start (works whether applied by the relay, sqlx or psql).
COMMENT ON TABLE outbox IS 'relay schema 2';
