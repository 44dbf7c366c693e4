-- Schema 5: a mark is a HOT update. No index of the outbox table has a key or a
-- predicate on a column the relay changes when it marks a row PROCESSED (status,
-- processed_at, attempts, last_error), so Postgres rewrites the row in its own page and
-- touches no index: a fraction of the WAL of schema 4, and no index bloat.
--
-- What replaces the indexes on status:
-- - claims walk the primary key above a *floor* (`outbox_relay_floor`): every row at or
--   below it is settled (PROCESSED, FAILED), parked, or waiting for a retry. The relay
--   raises it past such rows (never past an id that can still commit: the horizon of
--   schema 4); replay, discard and un-parking lower it again in the transaction that
--   re-opens rows; retries that fall due are found through `outbox_due_idx`;
-- - rows that hold an aggregate back are those with a next_attempt_at: waiting for a
--   retry, parked ('infinity'), and FAILED rows not discarded (now 'infinity' too);
--   `outbox_blockers_idx` keeps just those, keyed by the aggregate's hash;
-- - retention walks ids from the oldest row (ids follow time) instead of an index on
--   processed_at.
--
-- Applied in one transaction by `outbox-relay migrate`: producers' inserts wait while it
-- rebuilds the blockers index (it reads the table once); stop relays of schema 4 first.

-- Room in each page for the marked version of its rows (a HOT update stays in its page).
ALTER TABLE outbox SET (fillfactor = 60);

CREATE TABLE IF NOT EXISTS outbox_relay_floor (
    singleton BOOLEAN PRIMARY KEY DEFAULT true CONSTRAINT outbox_relay_floor_one CHECK (singleton),
    -- Every PENDING row that is not parked has an id above it.
    floor     BIGINT NOT NULL DEFAULT 0,
    -- Bumped whenever the floor is lowered (rows re-opened below it).
    epoch     BIGINT NOT NULL DEFAULT 0
);
INSERT INTO outbox_relay_floor (singleton) VALUES (true) ON CONFLICT DO NOTHING;

UPDATE outbox SET next_attempt_at = 'infinity'
    WHERE status = 'FAILED' AND discarded_at IS NULL
      AND (next_attempt_at IS NULL OR next_attempt_at < 'infinity');
UPDATE outbox SET next_attempt_at = NULL
    WHERE status = 'FAILED' AND discarded_at IS NOT NULL AND next_attempt_at IS NOT NULL;

DROP INDEX IF EXISTS outbox_blockers_idx;
CREATE INDEX IF NOT EXISTS outbox_blockers_idx
    ON outbox (hashtext(aggregate_type || '/' || aggregate_id), id)
    WHERE next_attempt_at IS NOT NULL;
-- Retries by due time ('infinity', FAILED and parked rows, sort last and are not read).
CREATE INDEX IF NOT EXISTS outbox_due_idx ON outbox (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
DROP INDEX IF EXISTS outbox_pending_idx;
DROP INDEX IF EXISTS outbox_processed_idx;

COMMENT ON TABLE outbox IS 'relay schema 5';
