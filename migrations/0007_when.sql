-- Schema 7: an insert calls no function unless it needs one. Nothing about the rows changes.
--
-- A PL/pgSQL trigger call is most of what the relay's schema still costs a producer
-- (schema 6: ~6 of its ~11 µs per insert). Postgres evaluates a trigger's WHEN clause as
-- an expression and calls the function only when it is true, so the insert trigger
-- becomes two, each behind a WHEN clause:
--
-- 1. The doorbell (schema 6): WHEN the shared lock of the producer's slot is refused (a
--    relay instance holds the doorbell and waits for wake-ups), a function notifies. A
--    lock that is granted is held until commit, as before; no function call then.
-- 2. The order lock (schema 3): WHEN `outboxrelay.order_lock` is not 'off', a function
--    takes the aggregate's transaction-level lock and draws the row's id under it. With
--    the setting off (producers that lock the aggregate themselves, README), the id is the
--    column's identity default and no function is called at all.
--
-- The transaction id is no longer taken before the row's id (schema 4): the relay's
-- horizon now waits for the transactions that hold the table's RowExclusiveLock (every
-- insert takes it before its id is drawn, and holds it until it ends), not for xids.
--
-- Applied in one transaction; no table read, no index built.
DROP TRIGGER IF EXISTS outbox_insert_trg ON outbox;
DROP FUNCTION IF EXISTS outbox_insert();

CREATE OR REPLACE FUNCTION outbox_ring() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER AS $b$
BEGIN
    PERFORM pg_catalog.pg_notify('relay_wake_' OPERATOR(pg_catalog.||) TG_RELID::pg_catalog.text, '');
    RETURN NEW;
END
$b$;
DROP TRIGGER IF EXISTS outbox_doorbell_trg ON outbox;
CREATE TRIGGER outbox_doorbell_trg BEFORE INSERT ON outbox FOR EACH ROW
    WHEN (NOT pg_catalog.pg_try_advisory_xact_lock_shared(
              'outbox'::pg_catalog.regclass::pg_catalog.oid::pg_catalog.int4,
              pg_catalog.pg_backend_pid() OPERATOR(pg_catalog.%) 16))
    EXECUTE FUNCTION outbox_ring();

DO $do$
BEGIN
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION outbox_order() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER AS $b$
        BEGIN
            IF pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
                   NEW.aggregate_type OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) NEW.aggregate_id,
                   TG_RELID::pg_catalog.int8)) IS NULL THEN
                NULL;
            END IF;
            NEW.id := pg_catalog.nextval(%L::pg_catalog.regclass);
            RETURN NEW;
        END
        $b$
    $f$, pg_get_serial_sequence('outbox', 'id'));
END
$do$;
DROP TRIGGER IF EXISTS outbox_order_trg ON outbox;
CREATE TRIGGER outbox_order_trg BEFORE INSERT ON outbox FOR EACH ROW
    WHEN (pg_catalog.current_setting('outboxrelay.order_lock', true) IS DISTINCT FROM 'off')
    EXECUTE FUNCTION outbox_order();

COMMENT ON TABLE outbox IS 'relay schema 7';
