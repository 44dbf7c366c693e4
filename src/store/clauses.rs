//! The SQL fragments the store's statements share: reading `created_at` safely, the
//! blocker test, the horizon probe's columns, and the fetch statement's shape.

/// `col` (a `created_at`) when the relay can hold it as a time, else NULL. A producer may
/// write any `timestamptz`, `'infinity'` and years past 262 142 included, which chrono
/// (and sqlx's decoding into it) cannot represent: decoded as such, one such row panicked
/// every claim that read it. Statements that read `created_at` read it through this.
pub(crate) fn known_time(col: &str) -> String {
    format!("CASE WHEN isfinite({col}) AND {col} < '262000-01-01'::timestamptz THEN {col} END")
}

/// With `status = 'PENDING'`: not parked (what the floor counts).
pub(crate) const UNPARKED: &str =
    "(o.next_attempt_at IS NULL OR o.next_attempt_at < 'infinity'::timestamptz)";

/// `NOT EXISTS` a blocker of row `o`'s aggregate before it: a FAILED row (when `$2`, block
/// mode, and not discarded) or a row waiting for its retry. The probe goes through
/// `outbox_blockers_idx` (rows with a `next_attempt_at`: retries, parked and FAILED
/// rows), keyed by the aggregate's hash (any key length fits), and then compares the
/// keys in full.
pub(crate) fn blocker_clause(tbl: &str) -> String {
    no_blocker(tbl, "o", "$2", WAITING)
}

/// Which earlier `PENDING` rows with a `next_attempt_at` block (see `no_blocker`): those
/// still waiting for their retry, parked ones included.
pub(crate) const WAITING: &str = "b.next_attempt_at > now()";
/// Those waiting for a retry that will come (parked rows do not count).
pub(crate) const WAITING_UNPARKED: &str =
    "b.next_attempt_at > now() AND b.next_attempt_at < 'infinity'";
/// Every retry, due or not, parked rows included, except the due ones the statement
/// reads itself (`$1`) or the engine holds already, ahead in its queue (`$4`): a retry
/// that falls due between a claim's scan and its fetch, or that the scan's list of due
/// retries left out, must not let the rows after it go first.
pub(crate) const UNTAKEN_RETRY: &str =
    "NOT ((b.id = ANY($1) OR b.id = ANY($4)) AND b.next_attempt_at <= now())";

/// `NOT EXISTS` a blocker of row `row`'s aggregate before it (see `blocker_clause`);
/// `block` is the boolean parameter saying block mode; `pending` says which earlier
/// `PENDING` rows with a `next_attempt_at` count (`WAITING`, `WAITING_UNPARKED`,
/// `UNTAKEN_RETRY`).
pub(crate) fn no_blocker(tbl: &str, row: &str, block: &str, pending: &str) -> String {
    format!(
        "NOT EXISTS (
             SELECT 1 FROM {tbl} b
             WHERE hashtext(b.aggregate_type || '/' || b.aggregate_id)
                   = hashtext({row}.aggregate_type || '/' || {row}.aggregate_id)
               AND b.aggregate_type = {row}.aggregate_type
               AND b.aggregate_id = {row}.aggregate_id
               AND b.id < {row}.id
               AND b.next_attempt_at IS NOT NULL
               AND ((b.status = 'FAILED' AND b.discarded_at IS NULL AND {block})
                    OR (b.status = 'PENDING' AND {pending})))"
    )
}

/// The horizon probe's two columns (`Probe`): the table's highest visible id, and, when
/// `list` (an SQL boolean) is true, the transactions holding the table's
/// `RowExclusiveLock` when the statement lists them (after its snapshot). Every insert
/// takes that lock before its id is drawn and holds it until it ends, so a transaction
/// that drew an id at or below the first column and has not ended is in the second. The
/// statement's own backend (a read) is left out. Reading `pg_locks` costs ~170 µs of
/// Postgres CPU here (it copies the whole server's lock table), so scans list only now and
/// then: the sub-query is an init plan, run only when the `CASE` reaches it.
pub(crate) fn probe_columns(tbl: &str, list: &str) -> String {
    format!(
        "(SELECT coalesce(max(t.id), 0) FROM {tbl} t),
         CASE WHEN {list} THEN (SELECT coalesce(array_agg(l.virtualtransaction), '{{}}'::text[])
          FROM pg_catalog.pg_locks l
          WHERE l.locktype = 'relation' AND l.relation = '{tbl}'::regclass
            AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                              WHERE d.datname = current_database())
            AND l.mode = 'RowExclusiveLock' AND l.pid IS DISTINCT FROM pg_backend_pid()) END"
    )
}

/// The fetch (`Store::fetch`): the rows among `$1` (picked by the engine) that are still
/// due and behind no blocker, `ids` saying how the statement finds them, `text` how it
/// reads the text columns: as they are (`as_is`), or as bytes (`unreadable::stored_bytes`).
/// Its columns are read by position (`ClaimedRow`, `unreadable::RawRow`).
pub(super) fn fetch(
    tbl: &str,
    untaken: &str,
    floor_tbl: &str,
    ids: &str,
    text: fn(&str) -> String,
) -> String {
    let created_at = known_time("o.created_at");
    let [aggregate_type, aggregate_id, event_type, destination, routing_key, payload, headers] = [
        "o.aggregate_type",
        "o.aggregate_id",
        "o.event_type",
        "o.destination",
        "o.routing_key",
        "o.payload::text",
        "o.headers::text",
    ]
    .map(text);
    format!(
        "SELECT o.id, o.event_id, {aggregate_type} AS aggregate_type, {aggregate_id} AS aggregate_id,
                {event_type} AS event_type, {destination} AS destination,
                {routing_key} AS routing_key, {payload} AS payload, {headers} AS headers,
                o.attempts, {created_at} AS created_at,
                hashtext(o.aggregate_type || '/' || o.aggregate_id) AS hash
         FROM {tbl} o
         WHERE {ids}
           AND o.status = 'PENDING'
           AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
           AND {untaken}
           AND ($3::bigint IS NULL
                OR (SELECT f.epoch FROM {floor_tbl} f WHERE f.singleton) = $3)
         ORDER BY o.id"
    )
}

/// A column read as it is (`fetch`'s `text`).
pub(super) fn as_is(col: &str) -> String {
    col.to_string()
}
