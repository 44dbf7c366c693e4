-- Schema 8: one insert trigger again, with no WHEN clause. Nothing about the rows changes.
--
-- Schema 7 put the doorbell, the guard of the relay-owned columns and the order lock each
-- behind a trigger WHEN clause, so that an insert needing none of them calls no function.
-- But Postgres sets a trigger's WHEN clause up again for every statement (it reads the
-- stored expression back with stringToNode and prepares it when the executor starts), and
-- producers insert one row per statement: measured in a server-side loop of one-row
-- transactions (docs/write-path.md §8, 2026-12-06 evening), the three clauses cost more
-- than one PL/pgSQL call that makes the same three decisions as expressions (PL/pgSQL
-- prepares those once per session). Per transaction, `synchronous_commit = off`: bare
-- SPEC table 14-15 µs, the relay's table with no trigger 22, schema 7 39-41 with the
-- order lock on and 36-37 with it off, this schema 27 and 23-24.
--
-- The function does, in this order, what the three triggers did:
-- 1. the order lock (schema 3): unless `outboxrelay.order_lock` is 'off', the aggregate's
--    transaction-level lock, and the row's id drawn under it (with it off, the id is the
--    column's identity default);
-- 2. the guard (schema 2): relay-owned columns an insert sets are reset;
-- 3. the doorbell (schema 6): the shared lock of the producer's slot; refused only while a
--    relay instance holds it and waits for wake-ups, and then it notifies.
-- Every operator is schema-qualified (the function runs as its owner).
--
-- Applied in one transaction; no table read, no index built.
DROP TRIGGER IF EXISTS outbox_doorbell_trg ON outbox;
DROP TRIGGER IF EXISTS outbox_guard_trg ON outbox;
DROP TRIGGER IF EXISTS outbox_order_trg ON outbox;
DROP FUNCTION IF EXISTS outbox_ring();
DROP FUNCTION IF EXISTS outbox_guard();
DROP FUNCTION IF EXISTS outbox_order();

DO $do$
BEGIN
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION outbox_insert() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER AS $b$
        BEGIN
            IF COALESCE(pg_catalog.current_setting('outboxrelay.order_lock', true), '')
                   OPERATOR(pg_catalog.<>) 'off' THEN
                IF pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
                       NEW.aggregate_type OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) NEW.aggregate_id,
                       TG_RELID::pg_catalog.int8)) IS NULL THEN
                    NULL;
                END IF;
                NEW.id := pg_catalog.nextval(%L::pg_catalog.regclass);
            END IF;
            IF NEW.status IS NULL OR NEW.status OPERATOR(pg_catalog.<>) 'PENDING'
               OR NEW.attempts IS NULL OR NEW.attempts OPERATOR(pg_catalog.<>) 0
               OR NEW.last_error IS NOT NULL OR NEW.processed_at IS NOT NULL
               OR NEW.next_attempt_at IS NOT NULL OR NEW.discarded_at IS NOT NULL THEN
                NEW.status := 'PENDING';
                NEW.attempts := 0;
                NEW.last_error := NULL;
                NEW.processed_at := NULL;
                NEW.next_attempt_at := NULL;
                NEW.discarded_at := NULL;
            END IF;
            IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(TG_RELID::pg_catalog.int4,
                       pg_catalog.pg_backend_pid() OPERATOR(pg_catalog.%%) 16) THEN
                IF pg_catalog.pg_notify('relay_wake_' OPERATOR(pg_catalog.||) TG_RELID::pg_catalog.text, '')
                       IS NULL THEN
                    NULL;
                END IF;
            END IF;
            RETURN NEW;
        END
        $b$
    $f$, pg_get_serial_sequence('outbox', 'id'));
END
$do$;
DROP TRIGGER IF EXISTS outbox_insert_trg ON outbox;
CREATE TRIGGER outbox_insert_trg BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_insert();

COMMENT ON TABLE outbox IS 'relay schema 8';
