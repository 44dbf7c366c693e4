-- Schema 3: per-aggregate order by construction, wake-ups that do not serialize the
-- producers' commits, and no index a long key can break. Online: every statement here
-- takes its table lock for a moment only (the one index build reads the table once; see
-- docs/write-path.md for the measured pause).

-- Order by construction. The id of an outbox row is drawn under a transaction-scoped
-- lock on its aggregate, taken when the row is inserted and held until commit or
-- rollback: a second transaction writing the same aggregate waits at its INSERT until the
-- first has ended, then draws a higher id. So per aggregate, id order is commit order,
-- whatever the producers do. Rows of different aggregates never wait for each other.
-- (The identity default drawn before the trigger ran is discarded: two sequence values
-- per row; an `id` a producer supplies is replaced likewise.) The sequence is passed by
-- name, resolved once here, so the trigger works whatever the producer's search_path.
-- The same trigger guards the relay-owned columns: a new row always starts PENDING, with
-- no attempts, no error, no schedule (a producer cannot insert a row as PROCESSED, or
-- with a next_attempt_at that would hold its aggregate back for good).
CREATE OR REPLACE FUNCTION outbox_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(
        hashtextextended(NEW.aggregate_type || '/' || NEW.aggregate_id, TG_RELID::bigint));
    NEW.id := nextval(TG_ARGV[0]::regclass);
    NEW.status := 'PENDING';
    NEW.attempts := 0;
    NEW.last_error := NULL;
    NEW.processed_at := NULL;
    NEW.next_attempt_at := NULL;
    NEW.discarded_at := NULL;
    RETURN NEW;
END
$$;
-- Both trigger functions run as their owner (who ran this migration), so a producer
-- needs no privilege beyond INSERT (not on the sequence, not on the member table); a
-- fixed search_path keeps a caller's own objects out of them.
ALTER FUNCTION outbox_order() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
DROP TRIGGER IF EXISTS outbox_order_trg ON outbox;
DO $$
BEGIN
    EXECUTE format(
        'CREATE TRIGGER outbox_order_trg BEFORE INSERT ON outbox '
        'FOR EACH ROW EXECUTE FUNCTION outbox_order(%L)',
        pg_get_serial_sequence('outbox', 'id'));
END
$$;

-- Wake-ups only for a relay that waits for them. A relay that is draining finds new rows
-- by claiming again and needs no notification; each instance says in its member row
-- whether it is listening, and the insert trigger sends NOTIFY (which takes a
-- database-wide lock at commit) only while one is.
ALTER TABLE outbox_relay_members ADD COLUMN IF NOT EXISTS listening BOOLEAN NOT NULL DEFAULT false;
DO $do$
BEGIN
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $b$
        BEGIN
            IF EXISTS (SELECT 1 FROM %I.outbox_relay_members
                       WHERE listening AND alive_until > now()) THEN
                PERFORM pg_notify('relay_wake_' || TG_RELID::text, '');
            END IF;
            RETURN NULL;
        END
        $b$
    $f$, current_schema());
END
$do$;
ALTER FUNCTION outbox_notify() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

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
