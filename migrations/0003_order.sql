-- Schema 3: per-aggregate order by construction, wake-ups that do not serialize the
-- producers' commits, no index a long key can break, parked rows out of the claim's
-- index. Applied in one transaction by `outbox-relay migrate`: producers' inserts wait
-- while it rebuilds two partial indexes (it reads the table once; docs/write-path.md
-- gives the measured pause).

-- One BEFORE INSERT row trigger does what schema 3 asks of a producer's insert (one
-- trigger, not two: each trigger call is a measurable share of a one-row transaction).
--
-- 1. Order by construction. The row's id is drawn under a transaction-scoped lock on its
--    aggregate, taken here and held until commit or rollback: a second transaction
--    writing the same aggregate waits at its INSERT until the first has ended, then draws
--    a higher id. So per aggregate, id order is commit order, whatever the producers do;
--    rows of different aggregates never wait for each other. (The identity default drawn
--    before the trigger ran is discarded: two sequence values per row; an id a producer
--    supplies is replaced likewise.) Producers that already serialize per aggregate can
--    skip the lock: `ALTER ROLE <producer> SET outboxrelay.order_lock = off` (the GUC
--    names have no `outbox_` in them: `outbox-relay migrate` renames those for other tables).
-- 2. The relay-owned columns are reset: a new row always starts PENDING, with no
--    attempts, no error, no schedule (a producer cannot insert a row as PROCESSED, or
--    with a next_attempt_at that would hold its aggregate back for good).
-- 3. Wake-ups only for a relay that waits for them: NOTIFY takes a database-wide lock at
--    commit, held through the WAL flush, so it is sent only while a live relay instance
--    says it listens (its member row), and checked once per transaction.
--
-- It runs as its owner (who ran this migration): a producer needs INSERT and nothing else.
-- Every name in it is schema-qualified (pg_catalog's too, operators included), so a
-- caller's search_path cannot substitute objects of its own; no SET clause, which would
-- cost every call and undo the per-transaction flag.
ALTER TABLE outbox_relay_members ADD COLUMN IF NOT EXISTS listening BOOLEAN NOT NULL DEFAULT false;
DROP TRIGGER IF EXISTS outbox_notify_trg ON outbox;
DROP FUNCTION IF EXISTS outbox_notify();
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
DROP TRIGGER IF EXISTS outbox_order_trg ON outbox;
DROP FUNCTION IF EXISTS outbox_order();
DROP TRIGGER IF EXISTS outbox_insert_trg ON outbox;
CREATE TRIGGER outbox_insert_trg BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_insert();

-- Blockers are found by the aggregate's hash (the partitioning hash), then compared in
-- full: an aggregate key of any length fits (a btree entry holds at most 2 704 bytes).
DROP INDEX IF EXISTS outbox_blockers_idx;
CREATE INDEX IF NOT EXISTS outbox_blockers_idx
    ON outbox (hashtext(aggregate_type || '/' || aggregate_id), id)
    WHERE status = 'FAILED' OR next_attempt_at IS NOT NULL;

-- Parked rows: a PENDING row behind a FAILED row of its aggregate (block mode) is parked
-- by the relay (next_attempt_at = 'infinity') and leaves the claim's index, so claims no
-- longer read it again and again; `replay` / `discard` of the blocker un-park it. A parked
-- row is still a blocker of the rows after it (it waits "forever").
DROP INDEX IF EXISTS outbox_pending_idx;
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON outbox (id)
    WHERE status = 'PENDING' AND (next_attempt_at IS NULL OR next_attempt_at < 'infinity');

COMMENT ON TABLE outbox IS 'relay schema 3';
