-- Schema 4: the relay's sweep never moves past an id that can still commit.
--
-- The relay walks pending rows in id order across claims (its *sweep*). A row whose
-- transaction is still open when the sweep passes its id becomes visible later, behind
-- the sweep; the rows its aggregate writes after it (drawn later: the order lock of
-- schema 3) would then be found first. So the relay keeps a *horizon*: the highest id
-- every transaction that could still insert at or below it has ended, learnt from two
-- snapshots (the table's highest visible id M under a snapshot S1; once a later snapshot's
-- xmin reaches S1's xmax, every transaction running at S1 has ended). Its sweep never
-- moves past the horizon; rows above it are still claimed, and looked at again.
--
-- That reasoning needs one thing of the producer's insert: the transaction has its xid
-- before it draws the row's id (otherwise a transaction could draw an id, then get an xid
-- newer than S1 and still be running after the horizon passed its id). The insert
-- trigger of schema 3 gains that one call; nothing else changes for producers.
DO $do$
BEGIN
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION outbox_insert() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER AS $b$
        DECLARE
            flag pg_catalog.text := 'outboxrelay.woken_' OPERATOR(pg_catalog.||) TG_RELID::pg_catalog.text;
        BEGIN
            IF COALESCE(pg_catalog.current_setting('outboxrelay.order_lock', true), '')
                   OPERATOR(pg_catalog.<>) 'off' THEN
                PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
                    NEW.aggregate_type OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||) NEW.aggregate_id,
                    TG_RELID::pg_catalog.int8));
            END IF;
            PERFORM pg_catalog.pg_current_xact_id();
            NEW.id := pg_catalog.nextval(%L::pg_catalog.regclass);
            NEW.status := 'PENDING';
            NEW.attempts := 0;
            NEW.last_error := NULL;
            NEW.processed_at := NULL;
            NEW.next_attempt_at := NULL;
            NEW.discarded_at := NULL;
            IF COALESCE(pg_catalog.current_setting(flag, true), '') OPERATOR(pg_catalog.<>) '1' THEN
                PERFORM pg_catalog.set_config(flag, '1', true);
                IF EXISTS (SELECT 1 FROM %I.outbox_relay_members
                           WHERE listening AND alive_until OPERATOR(pg_catalog.>) pg_catalog.now()) THEN
                    PERFORM pg_catalog.pg_notify('relay_wake_' OPERATOR(pg_catalog.||) TG_RELID::pg_catalog.text, '');
                END IF;
            END IF;
            RETURN NEW;
        END
        $b$
    $f$, pg_get_serial_sequence('outbox', 'id'), current_schema());
END
$do$;

-- Ids must be drawn in the order of time: a sequence cache hands out blocks per session,
-- out of order across sessions. Only changed when it is not 1 already (no lock otherwise).
DO $do$
BEGIN
    IF (SELECT seqcache FROM pg_catalog.pg_sequence
        WHERE seqrelid = pg_get_serial_sequence('outbox', 'id')::regclass) <> 1 THEN
        EXECUTE format('ALTER SEQUENCE %s CACHE 1', pg_get_serial_sequence('outbox', 'id'));
    END IF;
END
$do$;

COMMENT ON TABLE outbox IS 'relay schema 4';
