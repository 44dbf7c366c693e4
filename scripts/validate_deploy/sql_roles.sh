#!/usr/bin/env bash
# deploy/sql/relay-role.sql, checked (a step of scripts/validate-deploy.sh):
#   1. the static GRANTs for the relay and producer roles are in the file;
#   2. live, against PostgreSQL at PGHOST (default 127.0.0.1) as VALIDATE_DEPLOY_PGUSER
#      (default postgres, a superuser): a scratch database and scratch roles; the owner (a
#      non-superuser with CREATEROLE, as on managed Postgres) applies migrations/ and the
#      role script twice (idempotent); then what each role may and may not do, the relay
#      role's attributes, and that an over-powered existing relay role is refused. All
#      dropped afterwards. VALIDATE_DEPLOY_SQL=0 skips the live part; a missing psql or
#      an unreachable server is a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SQL=deploy/sql/relay-role.sql

grep -q 'GRANT SELECT, UPDATE, DELETE ON TABLE :"schema".:"outbox_table" TO :"relay_role"' "$SQL" &&
    grep -q 'GRANT SELECT, UPDATE ON TABLE :"schema".:"floor_table" TO :"relay_role"' "$SQL" &&
    grep -q 'GRANT INSERT ON TABLE :"schema".:"outbox_table" TO :"producer_role"' "$SQL" ||
    { echo "  error: $SQL: expected GRANT statements missing" >&2; exit 1; }
echo "static grants present"
if [ "${VALIDATE_DEPLOY_SQL:-1}" = "0" ]; then
    echo "live check skipped: VALIDATE_DEPLOY_SQL=0"
    exit 0
fi
host="${PGHOST:-127.0.0.1}" admin="${VALIDATE_DEPLOY_PGUSER:-postgres}"
command -v psql >/dev/null || { echo "  error: psql not on PATH (VALIDATE_DEPLOY_SQL=0 skips the live check)" >&2; exit 1; }
if ! psql -X -h "$host" -U "$admin" -d postgres -Atc \
    "SELECT 1 FROM pg_roles WHERE rolname = current_user AND rolsuper AND rolcreaterole" 2>/dev/null | grep -qx 1; then
    echo "  error: no PostgreSQL superuser $admin reachable at $host (VALIDATE_DEPLOY_SQL=0 skips the live check)" >&2
    exit 1
fi

sfx="vd$$_$RANDOM"
db="outbox_deploy_check_$sfx" owner="vchk_owner_$sfx" relay="vchk_relay_$sfx"
prod="vchk_producer_$sfx" svc="vchk_svc_$sfx"
errfile="$(mktemp)"
export PGOPTIONS="-c client_min_messages=warning"
adm() { psql -X -q -v ON_ERROR_STOP=1 -h "$host" -U "$admin" -d postgres "$@"; }
as() { local u=$1; shift; psql -X -q -v ON_ERROR_STOP=1 -h "$host" -U "$u" -d "$db" "$@"; }
ok() {
    if ! as "$1" -c "$2" >/dev/null 2>"$errfile"; then
        echo "  should be allowed for $1: $2" >&2; cat "$errfile" >&2; return 1
    fi
}
deny() {
    if as "$1" -c "$2" >/dev/null 2>"$errfile"; then
        echo "  should be denied for $1: $2" >&2; return 1
    fi
    if ! grep -qE 'permission denied|must be owner' "$errfile"; then
        echo "  denied for another reason ($1: $2):" >&2; cat "$errfile" >&2; return 1
    fi
}
cleanup() {
    adm -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    for r in "$svc" "$relay" "$prod" "$owner"; do adm -c "DROP ROLE IF EXISTS $r" >/dev/null 2>&1 || true; done
    rm -f "$errfile"
}
trap cleanup EXIT
adm -c "CREATE ROLE $owner LOGIN CREATEROLE" -c "CREATE DATABASE $db OWNER $owner"
# The migrations as `outbox-relay migrate` applies them, then the role script, twice.
migrations=()
for f in migrations/*.sql; do migrations+=(-f "$f"); done
as "$owner" "${migrations[@]}" -c "CREATE TABLE IF NOT EXISTS outbox_relay_migrations (
        version BIGINT PRIMARY KEY, description TEXT NOT NULL,
        installed_on TIMESTAMPTZ NOT NULL DEFAULT now())"
for _ in 1 2; do
    as "$owner" -v relay_role="$relay" -v producer_role="$prod" -v relay_password=validate -f "$SQL"
done
as "$owner" -c "CREATE ROLE $svc LOGIN" -c "GRANT $prod TO $svc"
ok   "$svc"   "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', '42', 'order.created', '{\"orderId\":\"42\"}') RETURNING id, event_id"
deny "$svc"   "SELECT payload FROM outbox"
deny "$svc"   "UPDATE outbox SET status = 'FAILED'"
deny "$svc"   "DELETE FROM outbox"
ok   "$relay" "SELECT id, payload, headers FROM outbox WHERE status = 'PENDING' ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED"
ok   "$relay" "UPDATE outbox SET status = 'PROCESSED', processed_at = now(), next_attempt_at = NULL, attempts = attempts + 1, last_error = NULL, discarded_at = NULL"
ok   "$relay" "DELETE FROM outbox WHERE status = 'PROCESSED' AND processed_at < now() - interval '1 day'"
ok   "$relay" "UPDATE outbox_relay_leases SET owner = 'x', lease_until = now() WHERE partition IN (SELECT partition FROM outbox_relay_leases LIMIT 4 FOR UPDATE SKIP LOCKED)"
ok   "$relay" "INSERT INTO outbox_relay_members (instance, alive_until) VALUES ('a', now()) ON CONFLICT (instance) DO UPDATE SET alive_until = EXCLUDED.alive_until"
ok   "$relay" "DELETE FROM outbox_relay_members WHERE instance = 'a'"
ok   "$relay" "UPDATE outbox_relay_floor SET floor = floor, epoch = epoch WHERE singleton RETURNING floor, epoch"
ok   "$relay" "SELECT version FROM outbox_relay_migrations"
ok   "$relay" "SELECT obj_description(to_regclass('public.outbox'), 'pg_class')"
deny "$relay" "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('o', '1', 'e', '{}')"
deny "$relay" "INSERT INTO outbox_relay_migrations (version, description) VALUES (99, 'x')"
deny "$relay" "TRUNCATE outbox"
deny "$relay" "CREATE TABLE public.not_allowed (id int)"
deny "$relay" "ALTER TABLE outbox ADD COLUMN not_allowed int"
attrs="$(adm -Atc "SELECT concat_ws(',', rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolinherit) FROM pg_roles WHERE rolname = '$relay'")"
if [ "$attrs" != "t,f,f,f,f,f,f" ]; then
    echo "  relay role attributes (login,super,createdb,createrole,replication,bypassrls,inherit): $attrs" >&2
    exit 1
fi
# A pre-existing role with too much power is refused, not silently used.
adm -c "ALTER ROLE $relay CREATEDB"
if as "$owner" -v relay_role="$relay" -v producer_role="$prod" -f "$SQL" >/dev/null 2>&1; then
    echo "  an over-powered relay role was accepted" >&2
    exit 1
fi
echo "live check OK: migrations + relay-role.sql applied twice; relay and producer privileges as intended"
