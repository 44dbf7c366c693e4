-- outbox-relay: least-privilege database roles.
--
-- Run AFTER the relay's migrations have created its tables (`outbox-relay migrate`,
-- or the deploy/k8s/overlays/migrate Job), in the database that holds the outbox, as
-- a role that may create roles and grant on those tables: a superuser, or the tables'
-- owner with CREATEROLE (typical on managed Postgres: the admin user).
--
--   psql "postgres://app_owner@db:5432/app" -v ON_ERROR_STOP=1 \
--        -f deploy/sql/relay-role.sql
--
-- Optional psql variables (-v name=value), with their defaults:
--   schema         public         schema of the outbox table (database.table = "schema.table")
--   outbox_table   outbox         the outbox table's name (the relay's own tables are
--                                 <outbox_table>_relay_leases / _members / _floor /
--                                 _migrations)
--   relay_role     outbox_relay   LOGIN role the relay connects as (its Secret's database-url)
--   producer_role  outbox_producer  NOLOGIN group role for services that write the outbox
--   relay_password (unset)        if set, becomes relay_role's password; otherwise set it
--                                 with `\password outbox_relay` so it stays out of shell history
--
-- Idempotent: re-running it (e.g. after a relay upgrade added migrations) resets the
-- privileges below to exactly this list.
--
-- Who runs migrations ("outbox_migrator"): there is deliberately no separate migrator
-- role here. Migrations CREATE/ALTER tables, indexes, triggers and functions, which
-- PostgreSQL only lets the table OWNER do; so `outbox-relay migrate` runs with the
-- owner's URL (the Secret outbox-relay-migrator used by the migrate Job), typically the
-- same role that runs the application's own schema migrations. The long-running relay
-- never holds that URL: it gets only the grants below and cannot change the schema.

\set ON_ERROR_STOP on

\if :{?schema}
\else
  \set schema public
\endif
\if :{?outbox_table}
\else
  \set outbox_table outbox
\endif
\if :{?relay_role}
\else
  \set relay_role outbox_relay
\endif
\if :{?producer_role}
\else
  \set producer_role outbox_producer
\endif
\set leases_table :outbox_table '_relay_leases'
\set members_table :outbox_table '_relay_members'
\set floor_table :outbox_table '_relay_floor'
\set history_table :outbox_table '_relay_migrations'

BEGIN;

-- ---------------------------------------------------------------------------
-- Roles
-- ---------------------------------------------------------------------------

-- The relay's login role, created only if missing: may log in, nothing else. No
-- superuser, cannot create databases or roles, no replication, does not bypass
-- row-level security, inherits no other role's privileges.
SELECT format('CREATE ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
              'NOREPLICATION NOBYPASSRLS NOINHERIT', :'relay_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'relay_role') \gexec
ALTER ROLE :"relay_role" WITH LOGIN NOINHERIT;
-- A pre-existing role with more power than that is refused, not silently used.
-- (Only a superuser may remove SUPERUSER/REPLICATION/BYPASSRLS, so this script
-- checks them instead of altering them: it also runs as a CREATEROLE admin.)
SELECT format('DO $do$ BEGIN RAISE EXCEPTION %L; END $do$',
              format('role %s must not have SUPERUSER, CREATEDB, CREATEROLE, REPLICATION '
                     'or BYPASSRLS: fix it with ALTER ROLE, then re-run', rolname))
  FROM pg_roles
 WHERE rolname = :'relay_role'
   AND (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls) \gexec

\if :{?relay_password}
-- Password from -v relay_password=... (stored hashed, scram-sha-256 by default).
ALTER ROLE :"relay_role" WITH PASSWORD :'relay_password';
\endif

-- The producers' group role: NOLOGIN. Grant it to the business service's own login
-- role, e.g.  GRANT outbox_producer TO order_service;
SELECT format('CREATE ROLE %I WITH NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
              'NOREPLICATION NOBYPASSRLS', :'producer_role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'producer_role') \gexec

-- ---------------------------------------------------------------------------
-- outbox_relay: the relay daemon and its operator commands (status, replay, discard)
-- ---------------------------------------------------------------------------

-- Connect to this database (PUBLIC usually has CONNECT, hardened clusters revoke it).
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'relay_role') \gexec

-- Resolve names inside the outbox's schema. USAGE only: no CREATE, so the relay can
-- never create or alter objects.
GRANT USAGE ON SCHEMA :"schema" TO :"relay_role";

-- Start from nothing on each table, so a re-run removes anything granted by hand.
REVOKE ALL ON TABLE :"schema".:"outbox_table" FROM :"relay_role";
REVOKE ALL ON TABLE :"schema".:"leases_table" FROM :"relay_role";
REVOKE ALL ON TABLE :"schema".:"members_table" FROM :"relay_role";
REVOKE ALL ON TABLE :"schema".:"floor_table" FROM :"relay_role";

-- outbox: SELECT to find committed PENDING rows, count them for metrics and `status`;
-- UPDATE to claim rows (SELECT ... FOR UPDATE SKIP LOCKED needs UPDATE) and to set
-- status / attempts / last_error / processed_at / next attempt time, and for
-- `replay` / `discard`; DELETE for retention of PROCESSED rows (relay.retention).
-- No INSERT: the relay never writes events. No TRUNCATE.
GRANT SELECT, UPDATE, DELETE ON TABLE :"schema".:"outbox_table" TO :"relay_role";

-- <outbox>_relay_leases: partition leases shared by all relay instances. SELECT and
-- UPDATE to take, renew and hand back leases (FOR UPDATE SKIP LOCKED); INSERT and
-- DELETE so the lease set can be (re)built.
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE :"schema".:"leases_table" TO :"relay_role";

-- <outbox>_relay_members: instance heartbeats. INSERT ... ON CONFLICT DO UPDATE to
-- join and heartbeat, SELECT to count live instances, DELETE to leave at shutdown
-- and to sweep long-dead members.
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE :"schema".:"members_table" TO :"relay_role";

-- <outbox>_relay_floor (schema 5): the one-row claim floor. SELECT, as every claim reads
-- it; UPDATE, as the maintenance leader raises it past settled rows and `replay` /
-- un-parking lower it. (Missing from this script until 2026-12-07: a relay running as
-- this role failed every claim with "permission denied for table outbox_relay_floor".)
GRANT SELECT, UPDATE ON TABLE :"schema".:"floor_table" TO :"relay_role";

-- <outbox>_relay_migrations: migration history, for operators and troubleshooting
-- (`run` itself checks the schema marker on the outbox table). SELECT only: applying
-- migrations is the owner's job (above). The table exists only when the migrations
-- were applied by `outbox-relay migrate` (not by psql -f / sqlx), hence the check.
SELECT format('REVOKE ALL ON TABLE %I.%I FROM %I', :'schema', :'history_table', :'relay_role')
 WHERE to_regclass(format('%I.%I', :'schema', :'history_table')) IS NOT NULL \gexec
SELECT format('GRANT SELECT ON TABLE %I.%I TO %I', :'schema', :'history_table', :'relay_role')
 WHERE to_regclass(format('%I.%I', :'schema', :'history_table')) IS NOT NULL \gexec

-- ---------------------------------------------------------------------------
-- outbox_producer: business services writing events in their own transactions
-- ---------------------------------------------------------------------------

GRANT USAGE ON SCHEMA :"schema" TO :"producer_role";
REVOKE ALL ON TABLE :"schema".:"outbox_table" FROM :"producer_role";

-- INSERT the outbox row in the same transaction as the business rows. Nothing else is
-- needed: the insert triggers of schema 3 run as their owner (they draw the id under the
-- aggregate's lock and reset the relay-owned columns — status, attempts, last_error,
-- processed_at, next_attempt_at, discarded_at — and any producer-supplied id).
GRANT INSERT ON TABLE :"schema".:"outbox_table" TO :"producer_role";

-- Lets `INSERT ... RETURNING id, event_id` work (e.g. to log the event id); the
-- producer still cannot read other events' payloads. Drop it if unused.
GRANT SELECT (id, event_id) ON TABLE :"schema".:"outbox_table" TO :"producer_role";

COMMIT;
