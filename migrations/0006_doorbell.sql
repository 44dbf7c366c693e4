-- Schema 6: the producer's insert costs less. Nothing about the rows changes.
--
-- 1. Wake-ups without a query. Until now the insert trigger read the relay's member
--    rows (is any live instance listening?) once per transaction: a query, the largest
--    share of the trigger's cost. Now a relay instance that waits for wake-ups holds
--    session-level advisory locks on its LISTEN connection — keys (the table's oid,
--    slot 0..15), plus slot 16 among relay instances — and the trigger tries a *shared*
--    transaction-level lock on one slot (picked by the producer's backend pid, so
--    producers do not queue on one lock): refused only while a relay holds it, and then
--    it notifies. A lock it is granted is held until commit, so a relay cannot start
--    listening while a producer that decided not to notify is still open: the relay
--    claims once right after taking the locks, and nothing committed before it listens
--    goes unseen (the member-row flag had a window there, covered by polling). A relay
--    that dies drops its locks with its connection.
-- 2. The guard of the relay-owned columns moves to a trigger of its own whose WHEN
--    clause Postgres evaluates without calling a function: it runs only for an insert
--    that sets one of those columns (which it resets, as before).
-- 3. The order lock, the transaction id and the row's id as before (schemas 3 and 4),
--    evaluated as expressions (PERFORM runs a query through the executor).
--
-- Applied in one transaction; no table read, no index built. Stop relays of schema 5
-- first: they would write the member-row flag this migration drops.
DROP TRIGGER IF EXISTS outbox_insert_trg ON outbox;
DO $do$
BEGIN
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION outbox_insert() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER AS $b$
        BEGIN
            IF pg_catalog.current_setting('outboxrelay.order_lock', true)
                   IS DISTINCT FROM 'off' THEN
                IF pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
                       NEW.aggregate_type OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) NEW.aggregate_id,
                       TG_RELID::pg_catalog.int8)) IS NULL THEN
                    NULL;
                END IF;
            END IF;
            IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(TG_RELID::pg_catalog.int4,
                       pg_catalog.pg_backend_pid() OPERATOR(pg_catalog.%%) 16) THEN
                PERFORM pg_catalog.pg_notify('relay_wake_' OPERATOR(pg_catalog.||) TG_RELID::pg_catalog.text, '');
            END IF;
            NEW.id := CASE WHEN pg_catalog.pg_current_xact_id() IS NULL THEN NULL
                           ELSE pg_catalog.nextval(%L::pg_catalog.regclass) END;
            RETURN NEW;
        END
        $b$
    $f$, pg_get_serial_sequence('outbox', 'id'));
END
$do$;
CREATE TRIGGER outbox_insert_trg BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_insert();

CREATE OR REPLACE FUNCTION outbox_guard() RETURNS trigger LANGUAGE plpgsql AS $b$
BEGIN
    NEW.status := 'PENDING';
    NEW.attempts := 0;
    NEW.last_error := NULL;
    NEW.processed_at := NULL;
    NEW.next_attempt_at := NULL;
    NEW.discarded_at := NULL;
    RETURN NEW;
END
$b$;
DROP TRIGGER IF EXISTS outbox_guard_trg ON outbox;
CREATE TRIGGER outbox_guard_trg BEFORE INSERT ON outbox FOR EACH ROW
    WHEN (NEW.status IS DISTINCT FROM 'PENDING' OR NEW.attempts IS DISTINCT FROM 0
          OR NEW.last_error IS NOT NULL OR NEW.processed_at IS NOT NULL
          OR NEW.next_attempt_at IS NOT NULL OR NEW.discarded_at IS NOT NULL)
    EXECUTE FUNCTION outbox_guard();

ALTER TABLE outbox_relay_members DROP COLUMN IF EXISTS listening;

COMMENT ON TABLE outbox IS 'relay schema 6';
