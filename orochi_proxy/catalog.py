"""The cluster catalog: a schema in the metadata database plus an in-memory cache of it.

Why a real Postgres schema: the proxy is stateless, so the cluster's shape (nodes, and later
logical tables, shards, hypertables, chunks, policies, jobs, the 2PC log) must live somewhere every
replica can read and change transactionally. Why a cache: the data path consults the catalog for
every statement and cannot afford a round trip; it reads plain Python objects instead.

Consistency between replicas rests on one counter, ``orochi_catalog.catalog_version``. Every change
runs in one transaction that locks that row first (so all catalog writers are serialised and
versions follow commit order), changes the tables, bumps the counter and sends
``NOTIFY orochi_catalog_changed, '<version>'``. Postgres delivers the notification only at commit,
so a replica that receives it always reads the committed change. Each :class:`Catalog` listens on
a dedicated connection; when that connection breaks it reconnects with backoff and reloads, and a
periodic version poll catches anything missed in between.

Schema changes are numbered migrations (:data:`MIGRATIONS`); later features append new entries,
never edit applied ones. They run in one transaction under an advisory lock, so several proxy
processes starting at once neither race on ``CREATE`` nor apply a step twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from rewriter.model import ChunkInfo, ClusterModel, HypertableInfo, Shard, TableInfo

log = logging.getLogger(__name__)

SCHEMA = "orochi_catalog"
CHUNK_SCHEMA = "_timescaledb_internal"  # where chunk tables live on the nodes (TimescaleDB's name)
CHANNEL = "orochi_catalog_changed"

# pg_advisory_xact_lock key serialising migrations in one database ("orochi" + 0x0001).
# Advisory locks are scoped to the current database, so catalogs in other databases don't wait.
MIGRATION_LOCK_KEY = 0x6F726F6368690001

# Host spellings that all mean "this machine"; used to decide whether a node is the metadata node
# whatever spelling the operator used in the config and in citus_add_node.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})

# Errors that mean "the connection is gone" rather than "the statement was wrong".
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
)


@dataclass(frozen=True)
class NodeInfo:
    """One PostgreSQL server in the cluster, as cached by every proxy."""

    node_id: int
    host: str
    port: int
    is_active: bool
    is_metadata: bool

    @property
    def address(self) -> str:
        """``host:port`` as users write it in messages and in ``citus_add_node``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HypertableSpec:
    """A new hypertable's dimensions (see ``orochi_catalog.hypertables``)."""

    time_column: str
    time_type: str
    chunk_interval: int
    space_column: str | None = None
    space_partitions: int | None = None


class CatalogError(Exception):
    """A catalog operation failed; ``sqlstate`` lets the server send a proper ErrorResponse.

    The message is shown to SQL clients as is, so it says what was wrong and what to look at.
    """

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class Migration:
    """One numbered, append-only schema step (a list of SQL statements run in order)."""

    version: int
    description: str
    statements: tuple[str, ...]


# The schema name is fixed (the proxy rewrites citus_nodes to orochi_catalog.citus_nodes), so the
# SQL spells it out instead of formatting it in.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "catalog version, node registry, citus_nodes and pg_dist_node views",
        (
            """
            CREATE TABLE orochi_catalog.catalog_version (
                singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                version bigint NOT NULL
            )
            """,
            "INSERT INTO orochi_catalog.catalog_version (singleton, version) VALUES (true, 1)",
            # Where the metadata database lives, as the proxies' config names it; only the SQL
            # views need it (the cache computes is_metadata from the constructor's arguments).
            """
            CREATE TABLE orochi_catalog.metadata_node (
                singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                host text NOT NULL,
                port integer NOT NULL
            )
            """,
            """
            CREATE TABLE orochi_catalog.nodes (
                node_id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                host text NOT NULL CHECK (host <> ''),
                port integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
                is_active boolean NOT NULL DEFAULT true,
                added_at timestamptz NOT NULL DEFAULT now(),
                UNIQUE (host, port)
            )
            """,
            # SQL twin of _host_key(): loopback spellings compare equal, names case-insensitively.
            """
            CREATE FUNCTION orochi_catalog.host_key(h text) RETURNS text
            LANGUAGE sql IMMUTABLE PARALLEL SAFE
            AS $$ SELECT CASE WHEN lower(h) IN ('localhost', '127.0.0.1', '::1',
                                                'localhost.localdomain')
                              THEN 'localhost' ELSE lower(h) END $$
            """,
            """
            CREATE VIEW orochi_catalog.node_view AS
            SELECT n.node_id, n.host, n.port, n.is_active, n.added_at,
                   COALESCE(orochi_catalog.host_key(n.host) = orochi_catalog.host_key(m.host)
                            AND n.port = m.port, false) AS is_metadata
            FROM orochi_catalog.nodes n
            LEFT JOIN orochi_catalog.metadata_node m ON true
            """,
            # Citus 12+ citus_nodes has (nodename, nodeport, role, active); nodeid and isactive
            # are added so that pg_dist_node-style queries work too.
            """
            CREATE VIEW orochi_catalog.citus_nodes AS
            SELECT node_id AS nodeid,
                   host AS nodename,
                   port AS nodeport,
                   CASE WHEN is_metadata THEN 'coordinator' ELSE 'worker' END AS role,
                   is_active AS active,
                   is_active AS isactive
            FROM orochi_catalog.node_view
            ORDER BY node_id
            """,
            # Citus's pg_dist_node column set. groupid 0 marks the coordinator as in Citus; every
            # node (the metadata node included) holds shards, and only the metadata node holds
            # metadata (the proxies read it from there).
            """
            CREATE VIEW orochi_catalog.pg_dist_node AS
            SELECT node_id AS nodeid,
                   CASE WHEN is_metadata THEN 0 ELSE node_id END AS groupid,
                   host AS nodename,
                   port AS nodeport,
                   'default'::text AS noderack,
                   is_metadata AS hasmetadata,
                   is_active AS isactive,
                   'primary'::text AS noderole,
                   'default'::name AS nodecluster,
                   is_metadata AS metadatasynced,
                   true AS shouldhaveshards
            FROM orochi_catalog.node_view
            ORDER BY node_id
            """,
        ),
    ),
    Migration(
        2,
        "distributed and reference tables: colocation groups, tables, shards, placements",
        (
            "CREATE SEQUENCE orochi_catalog.shard_id_seq START 102008",
            """
            CREATE TABLE orochi_catalog.colocation_groups (
                colocation_id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                shard_count integer NOT NULL CHECK (shard_count > 0),
                dist_type text NOT NULL
            )
            """,
            """
            CREATE TABLE orochi_catalog.tables (
                schema_name text NOT NULL,
                table_name text NOT NULL,
                kind text NOT NULL CHECK (kind IN ('hash', 'reference')),
                dist_column text,
                dist_type text,
                colocation_id integer REFERENCES orochi_catalog.colocation_groups,
                created_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (schema_name, table_name),
                CHECK ((kind = 'hash') = (dist_column IS NOT NULL))
            )
            """,
            """
            CREATE TABLE orochi_catalog.shards (
                shard_id bigint PRIMARY KEY DEFAULT nextval('orochi_catalog.shard_id_seq'),
                schema_name text NOT NULL,
                table_name text NOT NULL,
                shard_index integer NOT NULL,
                FOREIGN KEY (schema_name, table_name) REFERENCES orochi_catalog.tables
                    ON DELETE CASCADE ON UPDATE CASCADE,
                UNIQUE (schema_name, table_name, shard_index)
            )
            """,
            """
            CREATE TABLE orochi_catalog.placements (
                shard_id bigint NOT NULL REFERENCES orochi_catalog.shards ON DELETE CASCADE,
                node_id integer NOT NULL REFERENCES orochi_catalog.nodes,
                PRIMARY KEY (shard_id, node_id)
            )
            """,
            # Filled by the proxy just before a query reads citus_shards (sizes live on the nodes).
            """
            CREATE TABLE orochi_catalog.shard_sizes (
                shard_id bigint NOT NULL,
                node_id integer NOT NULL,
                size_bytes bigint NOT NULL,
                measured_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (shard_id, node_id)
            )
            """,
            """
            CREATE VIEW orochi_catalog.citus_tables AS
            SELECT format('%I.%I', t.schema_name, t.table_name) AS table_name,
                   CASE t.kind WHEN 'hash' THEN 'distributed' ELSE 'reference' END AS citus_table_type,
                   COALESCE(t.dist_column, '<none>') AS distribution_column,
                   t.colocation_id,
                   pg_size_pretty(COALESCE((SELECT sum(z.size_bytes) FROM orochi_catalog.shards s
                        JOIN orochi_catalog.shard_sizes z USING (shard_id)
                        WHERE s.schema_name = t.schema_name AND s.table_name = t.table_name), 0))
                       AS table_size,
                   (SELECT count(*) FROM orochi_catalog.shards s
                     WHERE s.schema_name = t.schema_name AND s.table_name = t.table_name) AS shard_count,
                   current_user::name AS table_owner,
                   'heap'::text AS access_method
            FROM orochi_catalog.tables t
            ORDER BY 1
            """,
            """
            CREATE VIEW orochi_catalog.citus_shards AS
            SELECT format('%I.%I', s.schema_name, s.table_name) AS table_name,
                   s.shard_id AS shardid,
                   format('%I.%I', s.schema_name, s.table_name || '_' || s.shard_id) AS shard_name,
                   CASE t.kind WHEN 'hash' THEN 'distributed' ELSE 'reference' END AS citus_table_type,
                   t.colocation_id,
                   n.host AS nodename,
                   n.port AS nodeport,
                   n.node_id AS nodeid,
                   s.shard_index,
                   COALESCE(z.size_bytes, 0) AS shard_size
            FROM orochi_catalog.shards s
            JOIN orochi_catalog.tables t USING (schema_name, table_name)
            JOIN orochi_catalog.placements p USING (shard_id)
            JOIN orochi_catalog.nodes n USING (node_id)
            LEFT JOIN orochi_catalog.shard_sizes z ON z.shard_id = s.shard_id AND z.node_id = p.node_id
            ORDER BY 1, 2, nodeid
            """,
        ),
    ),
    Migration(
        3,
        "columns the proxy fills from sequences (serial, identity, nextval defaults)",
        (
            "ALTER TABLE orochi_catalog.tables ADD COLUMN fill_columns jsonb NOT NULL DEFAULT '{}'::jsonb",
        ),
    ),
    Migration(
        4,
        "one node per server: loopback spellings of a host are the same node",
        ("CREATE UNIQUE INDEX nodes_host_key_port ON orochi_catalog.nodes (orochi_catalog.host_key(host), port)",),
    ),
    Migration(
        5,
        "two-phase commit decisions (the commit point of a distributed transaction)",
        (
            """
            CREATE TABLE orochi_catalog.transactions (
                gid text PRIMARY KEY,
                coordinator bigint NOT NULL,
                node_ids integer[] NOT NULL,
                decided_at timestamptz NOT NULL DEFAULT now()
            )
            """,
        ),
    ),
    Migration(
        6,
        "hypertables: time (and space) dimensions, chunks, timescaledb_information views",
        (
            # A hypertable is also a row of ``tables`` (kind 'hash'): distributed by its space
            # column, or by its time column over one shard. Each shard is a table partitioned
            # by range of the time column on its node; chunks are its partitions.
            """
            CREATE TABLE orochi_catalog.hypertables (
                hypertable_id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                schema_name text NOT NULL,
                table_name text NOT NULL,
                time_column text NOT NULL,
                time_type text NOT NULL,
                chunk_interval bigint NOT NULL CHECK (chunk_interval > 0),
                space_column text,
                space_partitions integer CHECK (space_partitions > 0),
                compression jsonb,
                created_at timestamptz NOT NULL DEFAULT now(),
                FOREIGN KEY (schema_name, table_name) REFERENCES orochi_catalog.tables
                    ON DELETE CASCADE ON UPDATE CASCADE,
                UNIQUE (schema_name, table_name)
            )
            """,
            # range_start/range_end: the internal form of rewriter.timerange (microseconds
            # since 1970 UTC, or the integer); tier: hot (heap) | warm (compressed) | cold (S3).
            """
            CREATE TABLE orochi_catalog.chunks (
                chunk_id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                hypertable_id integer NOT NULL REFERENCES orochi_catalog.hypertables ON DELETE CASCADE,
                shard_id bigint NOT NULL REFERENCES orochi_catalog.shards ON DELETE CASCADE,
                range_start bigint NOT NULL,
                range_end bigint NOT NULL CHECK (range_end > range_start),
                schema_name text NOT NULL,
                table_name text NOT NULL,
                tier text NOT NULL DEFAULT 'hot' CHECK (tier IN ('hot', 'warm', 'cold')),
                location text,
                row_count bigint,
                size_bytes bigint,
                access_count bigint NOT NULL DEFAULT 0,
                last_access timestamptz,
                created_at timestamptz NOT NULL DEFAULT now(),
                UNIQUE (hypertable_id, shard_id, range_start),
                UNIQUE (schema_name, table_name)
            )
            """,
            # The instant of an internal time value (timestamp/date columns: read as UTC).
            """
            CREATE FUNCTION orochi_catalog.internal_to_timestamptz(v bigint) RETURNS timestamptz
            LANGUAGE sql IMMUTABLE PARALLEL SAFE
            AS $$ SELECT CASE WHEN v = -9223372036854775808 THEN '-infinity'::timestamptz
                              WHEN v = 9223372036854775807 THEN 'infinity'::timestamptz
                              ELSE 'epoch'::timestamptz + v * interval '1 microsecond' END $$
            """,
            "CREATE SCHEMA IF NOT EXISTS timescaledb_information",
            """
            CREATE VIEW timescaledb_information.hypertables AS
            SELECT h.schema_name::name AS hypertable_schema,
                   h.table_name::name AS hypertable_name,
                   current_user::name AS owner,
                   (1 + (h.space_column IS NOT NULL)::int)::smallint AS num_dimensions,
                   (SELECT count(*) FROM orochi_catalog.chunks c
                     WHERE c.hypertable_id = h.hypertable_id)::bigint AS num_chunks,
                   (h.compression IS NOT NULL) AS compression_enabled,
                   NULL::name[] AS tablespaces
            FROM orochi_catalog.hypertables h
            ORDER BY 1, 2
            """,
            """
            CREATE VIEW timescaledb_information.dimensions AS
            SELECT h.schema_name::name AS hypertable_schema,
                   h.table_name::name AS hypertable_name,
                   1 AS dimension_number,
                   h.time_column::name AS column_name,
                   h.time_type::regtype AS column_type,
                   'Time'::text AS dimension_type,
                   CASE WHEN h.time_type IN ('timestamptz', 'timestamp', 'date')
                        THEN h.chunk_interval * interval '1 microsecond' END AS time_interval,
                   CASE WHEN h.time_type NOT IN ('timestamptz', 'timestamp', 'date')
                        THEN h.chunk_interval END AS integer_interval,
                   NULL::name AS integer_now_func,
                   NULL::smallint AS num_partitions
            FROM orochi_catalog.hypertables h
            UNION ALL
            SELECT h.schema_name::name, h.table_name::name, 2, h.space_column::name,
                   NULL::regtype, 'Space'::text, NULL::interval, NULL::bigint, NULL::name,
                   h.space_partitions::smallint
            FROM orochi_catalog.hypertables h
            WHERE h.space_column IS NOT NULL
            ORDER BY 1, 2, 3
            """,
            """
            CREATE VIEW timescaledb_information.chunks AS
            SELECT h.schema_name::name AS hypertable_schema,
                   h.table_name::name AS hypertable_name,
                   c.schema_name::name AS chunk_schema,
                   c.table_name::name AS chunk_name,
                   h.time_column::name AS primary_dimension,
                   h.time_type::regtype AS primary_dimension_type,
                   CASE WHEN h.time_type IN ('timestamptz', 'timestamp', 'date')
                        THEN orochi_catalog.internal_to_timestamptz(c.range_start) END AS range_start,
                   CASE WHEN h.time_type IN ('timestamptz', 'timestamp', 'date')
                        THEN orochi_catalog.internal_to_timestamptz(c.range_end) END AS range_end,
                   CASE WHEN h.time_type NOT IN ('timestamptz', 'timestamp', 'date')
                        THEN c.range_start END AS range_start_integer,
                   CASE WHEN h.time_type NOT IN ('timestamptz', 'timestamp', 'date')
                        THEN c.range_end END AS range_end_integer,
                   (c.tier = 'warm') AS is_compressed,
                   NULL::name AS chunk_tablespace,
                   c.created_at AS chunk_creation_time,
                   c.tier AS tier,
                   p.node_id AS node_id
            FROM orochi_catalog.chunks c
            JOIN orochi_catalog.hypertables h USING (hypertable_id)
            LEFT JOIN orochi_catalog.placements p ON p.shard_id = c.shard_id
            ORDER BY 1, 2, c.range_start, c.chunk_id
            """,
        ),
    ),
    Migration(
        7,
        "jobs: schedules with leases and statistics, run history, timescaledb_information job views",
        (
            # One row per job: its definition (what alter_job changes), the run in progress
            # (running_*: a lease that is valid while the runner holds the job's advisory lock,
            # see policies/jobrun.py) and the statistics of TimescaleDB's bgw_job_stat.
            """
            CREATE TABLE orochi_catalog.jobs (
                job_id integer GENERATED BY DEFAULT AS IDENTITY (START WITH 1000) PRIMARY KEY,
                application_name text NOT NULL,
                proc_schema text NOT NULL,
                proc_name text NOT NULL,
                hypertable_id integer REFERENCES orochi_catalog.hypertables ON DELETE CASCADE,
                schedule_interval interval NOT NULL,
                max_runtime interval NOT NULL DEFAULT '0',
                max_retries integer NOT NULL DEFAULT -1,
                retry_period interval NOT NULL DEFAULT '5 minutes',
                scheduled boolean NOT NULL DEFAULT true,
                fixed_schedule boolean NOT NULL DEFAULT true,
                config jsonb,
                initial_start timestamptz,
                timezone text,
                check_schema text,
                check_name text,
                owner text NOT NULL DEFAULT current_user,
                next_start timestamptz NOT NULL DEFAULT now(),
                running_by text,
                running_since timestamptz,
                running_run_id bigint,
                last_start timestamptz,
                last_finish timestamptz,
                last_successful_finish timestamptz,
                last_run_success boolean,
                total_runs bigint NOT NULL DEFAULT 0,
                total_successes bigint NOT NULL DEFAULT 0,
                total_failures bigint NOT NULL DEFAULT 0,
                total_crashes bigint NOT NULL DEFAULT 0,
                consecutive_failures integer NOT NULL DEFAULT 0,
                consecutive_crashes integer NOT NULL DEFAULT 0,
                total_duration interval NOT NULL DEFAULT '0',
                created_at timestamptz NOT NULL DEFAULT now()
            )
            """,
            "CREATE INDEX jobs_next_start ON orochi_catalog.jobs (next_start) WHERE scheduled",
            # Every writer (alter_job through a client session, policies, the CLI) gets the same
            # checks and messages; a CHECK constraint would only name itself.
            """
            CREATE FUNCTION orochi_catalog.jobs_check() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.schedule_interval <= interval '0' THEN
                    RAISE EXCEPTION 'schedule_interval must be positive, not %', NEW.schedule_interval
                        USING ERRCODE = '22023';
                END IF;
                IF NEW.max_runtime < interval '0' THEN
                    RAISE EXCEPTION 'max_runtime must not be negative, not % (0 means no limit)', NEW.max_runtime
                        USING ERRCODE = '22023';
                END IF;
                IF NEW.max_retries < -1 THEN
                    RAISE EXCEPTION 'max_retries must be -1 (retry forever) or at least 0, not %', NEW.max_retries
                        USING ERRCODE = '22023';
                END IF;
                IF NEW.retry_period < interval '0' THEN
                    RAISE EXCEPTION 'retry_period must not be negative, not %', NEW.retry_period
                        USING ERRCODE = '22023';
                END IF;
                RETURN NEW;
            END $$
            """,
            """
            CREATE TRIGGER jobs_check
                BEFORE INSERT OR UPDATE OF schedule_interval, max_runtime, max_retries, retry_period
                ON orochi_catalog.jobs FOR EACH ROW EXECUTE FUNCTION orochi_catalog.jobs_check()
            """,
            # The first slot origin + k * step after ``after`` (k >= 0): fixed schedules run on
            # these. Calendar steps (months) are added as PostgreSQL adds them; the epoch-based
            # estimate of k is corrected by stepping.
            """
            CREATE FUNCTION orochi_catalog.job_next_slot(origin timestamptz, step interval, after timestamptz)
            RETURNS timestamptz LANGUAGE plpgsql STABLE AS $$
            DECLARE
                k bigint;
            BEGIN
                IF after < origin THEN
                    RETURN origin;
                END IF;
                k := floor(extract(epoch FROM after - origin) / extract(epoch FROM step))::bigint;
                WHILE k > 0 AND origin + k * step > after LOOP
                    k := k - 1;
                END LOOP;
                WHILE origin + k * step <= after LOOP
                    k := k + 1;
                END LOOP;
                RETURN origin + k * step;
            END $$
            """,
            # One row per run, kept after the job is deleted (job_errors shows them, as in
            # TimescaleDB). origin: 'schedule' (the leader's scheduler), 'run_job' (SQL), 'cli'.
            """
            CREATE TABLE orochi_catalog.job_runs (
                run_id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                job_id integer NOT NULL,
                proc_schema text NOT NULL,
                proc_name text NOT NULL,
                config jsonb,
                origin text NOT NULL,
                run_by text NOT NULL,
                pid integer,
                started_at timestamptz NOT NULL DEFAULT now(),
                finished_at timestamptz,
                succeeded boolean,
                sqlerrcode text,
                err_message text
            )
            """,
            "CREATE INDEX job_runs_job_id ON orochi_catalog.job_runs (job_id, run_id)",
            # TimescaleDB 2.x column names and types.
            """
            CREATE VIEW timescaledb_information.jobs AS
            SELECT j.job_id,
                   j.application_name::name AS application_name,
                   j.schedule_interval,
                   j.max_runtime,
                   j.max_retries,
                   j.retry_period,
                   j.proc_schema::name AS proc_schema,
                   j.proc_name::name AS proc_name,
                   to_regrole(quote_ident(j.owner)) AS owner,
                   j.scheduled,
                   j.fixed_schedule,
                   j.config,
                   j.next_start,
                   j.initial_start,
                   h.schema_name::name AS hypertable_schema,
                   h.table_name::name AS hypertable_name,
                   j.check_schema::name AS check_schema,
                   j.check_name::name AS check_name
            FROM orochi_catalog.jobs j
            LEFT JOIN orochi_catalog.hypertables h USING (hypertable_id)
            ORDER BY j.job_id
            """,
            """
            CREATE VIEW timescaledb_information.job_stats AS
            SELECT h.schema_name::name AS hypertable_schema,
                   h.table_name::name AS hypertable_name,
                   j.job_id,
                   j.last_start AS last_run_started_at,
                   j.last_successful_finish,
                   CASE WHEN j.last_finish IS NULL THEN NULL
                        WHEN j.last_run_success THEN 'Success' ELSE 'Failed' END AS last_run_status,
                   CASE WHEN j.running_by IS NOT NULL THEN 'Running'
                        WHEN NOT j.scheduled THEN 'Paused' ELSE 'Scheduled' END AS job_status,
                   CASE WHEN j.last_finish > j.last_start THEN j.last_finish - j.last_start END
                       AS last_run_duration,
                   CASE WHEN j.scheduled THEN j.next_start END AS next_start,
                   j.total_runs,
                   j.total_successes,
                   j.total_failures
            FROM orochi_catalog.jobs j
            LEFT JOIN orochi_catalog.hypertables h USING (hypertable_id)
            ORDER BY j.job_id
            """,
            """
            CREATE VIEW timescaledb_information.job_errors AS
            SELECT r.job_id,
                   r.proc_schema,
                   r.proc_name,
                   r.pid,
                   r.started_at AS start_time,
                   r.finished_at AS finish_time,
                   r.sqlerrcode,
                   r.err_message
            FROM orochi_catalog.job_runs r
            WHERE NOT r.succeeded
            ORDER BY r.run_id
            """,
            """
            CREATE VIEW timescaledb_information.job_history AS
            SELECT r.run_id AS id,
                   r.job_id,
                   r.succeeded,
                   r.proc_schema,
                   r.proc_name,
                   r.pid,
                   r.started_at AS start_time,
                   r.finished_at AS finish_time,
                   r.config,
                   r.sqlerrcode,
                   r.err_message
            FROM orochi_catalog.job_runs r
            ORDER BY r.run_id
            """,
        ),
    ),
    Migration(
        8,
        "continuous aggregates: materialized rollups of hypertables, timescaledb_information view",
        (
            # The view the user queries is a plain view over the materialization table (both on
            # the metadata node); query is the defining SELECT with the hypertable qualified.
            """
            CREATE TABLE orochi_catalog.continuous_aggregates (
                cagg_id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                view_schema text NOT NULL,
                view_name text NOT NULL,
                hypertable_id integer NOT NULL REFERENCES orochi_catalog.hypertables ON DELETE CASCADE,
                mat_schema text NOT NULL,
                mat_table text NOT NULL,
                query text NOT NULL,
                bucket_column text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                UNIQUE (view_schema, view_name)
            )
            """,
            """
            CREATE VIEW timescaledb_information.continuous_aggregates AS
            SELECT h.schema_name::name AS hypertable_schema,
                   h.table_name::name AS hypertable_name,
                   c.view_schema::name AS view_schema,
                   c.view_name::name AS view_name,
                   current_user::name AS view_owner,
                   true AS materialized_only,
                   false AS compression_enabled,
                   c.mat_schema::name AS materialization_hypertable_schema,
                   c.mat_table::name AS materialization_hypertable_name,
                   c.query AS view_definition,
                   true AS finalized
            FROM orochi_catalog.continuous_aggregates c
            JOIN orochi_catalog.hypertables h USING (hypertable_id)
            ORDER BY 3, 4
            """,
        ),
    ),
)


def _host_key(host: str) -> str:
    """Normalise a host for equality: every loopback spelling is one host; DNS is case-blind."""
    h = host.strip().lower()
    return "localhost" if h in _LOOPBACK else h


async def migrate(
    conn: asyncpg.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> list[int]:
    """Bring the catalog schema up to date; returns the versions applied now (often none).

    Everything, including ``CREATE SCHEMA``, runs in one transaction after
    ``pg_advisory_xact_lock``: a second process blocks until the first commits and then sees
    nothing left to do. A failing step rolls the whole batch back, so a half-migrated catalog is
    never visible.
    """
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError("migration versions must be unique and ascending")
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(
            f"""
            CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations (
                version integer PRIMARY KEY,
                description text NOT NULL DEFAULT '',
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            r["version"]
            for r in await conn.fetch(f"SELECT version FROM {SCHEMA}.schema_migrations")
        }
        for m in migrations:
            if m.version in done:
                continue
            for stmt in m.statements:
                await conn.execute(stmt)
            await conn.execute(
                f"INSERT INTO {SCHEMA}.schema_migrations (version, description) VALUES ($1, $2)",
                m.version,
                m.description,
            )
            applied_now.append(m.version)
        newer = sorted(v for v in done if v > versions[-1]) if versions else []
        if newer:
            # A newer proxy migrated this catalog. Migrations only add, so keep going, but say so:
            # mixed versions during a rolling upgrade are expected, lasting ones are not.
            log.warning(
                "catalog schema has migrations %s that this orochi-proxy does not know; "
                "upgrade this process",
                newer,
            )
    if applied_now:
        log.info(
            "catalog %s migrated to version %d (applied %s)", SCHEMA, versions[-1], applied_now
        )
    return applied_now


@dataclass(frozen=True)
class _Snapshot:
    """Everything the cache holds, read in one repeatable-read transaction."""

    version: int
    nodes: tuple[NodeInfo, ...]
    tables: dict[tuple[str, str], TableInfo]
    aggregate_names: frozenset[str] = frozenset()
    caggs: frozenset[tuple[str, str]] = frozenset()  # (schema, view) of continuous aggregates


class _Change:
    """Handle given to the body of :meth:`Catalog._change`; set ``changed`` False for a no-op."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.changed = True


class Catalog:
    """The metadata store plus its cache; one instance per proxy process.

    Reads (``version``, ``nodes``, ``node()``) are synchronous and never touch the network.
    Changes go to the database first and then reload the cache, so after ``await add_node()``
    this process already sees the node, and other processes see it after their NOTIFY arrives.
    """

    SCHEMA = SCHEMA
    CHANNEL = CHANNEL

    def __init__(
        self,
        connect_kwargs: dict[str, Any],
        *,
        metadata_host: str,
        metadata_port: int,
        poll_interval: float = 5.0,
        max_backoff: float = 5.0,
    ) -> None:
        """``connect_kwargs`` go to ``asyncpg.connect(**kw)`` unchanged.

        ``poll_interval`` is how often the listen connection double-checks the version (a safety
        net for notifications lost while reconnecting); ``max_backoff`` caps reconnect waits.
        """
        self._connect_kwargs = dict(connect_kwargs)
        self.metadata_host = metadata_host
        self.metadata_port = int(metadata_port)
        self._metadata_key = (_host_key(metadata_host), self.metadata_port)
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff

        self.version: int = 0
        self.nodes: list[NodeInfo] = []
        self._by_id: dict[int, NodeInfo] = {}
        self.model = ClusterModel(0, {}, ())
        self.caggs: frozenset[tuple[str, str]] = frozenset()  # continuous aggregates (schema, view)

        self._conn: asyncpg.Connection | None = None
        self._conn_lock = asyncio.Lock()
        self._listeners: list[Callable[[int], None]] = []
        self._changed = asyncio.Event()
        self._listen_task: asyncio.Task[None] | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_pending = False
        self._closing = False
        self._opened = False

    # ----------------------------------------------------------------------------------------
    # lifecycle

    async def open(self) -> None:
        """Connect, migrate, start listening, then load the cache.

        LISTEN starts before the first load so that a change committed in between is not missed:
        it is either in the loaded snapshot or announced afterwards.
        """
        if self._opened:
            return
        self._closing = False
        try:
            conn = await self._command_conn()
            async with self._conn_lock:
                await migrate(conn)
                await self._record_metadata_node(conn)
            listen_conn = await self._connect_listener()
            self._listen_task = asyncio.get_running_loop().create_task(
                self._listen_loop(listen_conn), name="orochi-catalog-listen"
            )
            await self.reload()
        except asyncpg.PostgresError as exc:
            await self.close()
            raise _translate(exc) from exc
        except BaseException:
            await self.close()
            raise
        self._opened = True

    async def close(self) -> None:
        """Stop listening and close both connections; the cache stays readable."""
        self._closing = True
        self._opened = False
        for task in (self._listen_task, self._reload_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._listen_task = None
        self._reload_task = None
        for conn in (self._listen_conn, self._conn):
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), timeout=2.0)
                except Exception:
                    conn.terminate()
        self._listen_conn = None
        self._conn = None

    async def __aenter__(self) -> Catalog:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------------------------------
    # cached reads

    def node(self, node_id: int) -> NodeInfo:
        """The cached node with this id, or CatalogError 42704."""
        try:
            return self._by_id[node_id]
        except KeyError:
            raise CatalogError(
                "42704", f"node {node_id} is not in the cluster; see citus_nodes"
            ) from None

    @property
    def metadata_node(self) -> NodeInfo | None:
        """The registered node that hosts the metadata database, if it was added."""
        return next((n for n in self.nodes if n.is_metadata), None)

    def is_metadata_address(self, host: str, port: int) -> bool:
        """Whether ``host:port`` names the metadata node (loopback spellings are equal)."""
        return (_host_key(host), int(port)) == self._metadata_key

    # ----------------------------------------------------------------------------------------
    # changes

    async def add_node(self, host: str, port: int) -> int:
        """Register a node (``citus_add_node``); returns its id, the existing one if known."""
        host, port = _check_address(host, port)
        for attempt in (0, 1):
            try:
                async with self._change() as ch:
                    node_id = await ch.conn.fetchval(
                        f"INSERT INTO {SCHEMA}.nodes (host, port) VALUES ($1, $2) "
                        "ON CONFLICT DO NOTHING RETURNING node_id",
                        host,
                        port,
                    )
                    if node_id is None:
                        ch.changed = False
                        node_id = await ch.conn.fetchval(
                            f"SELECT node_id FROM {SCHEMA}.nodes "
                            f"WHERE {SCHEMA}.host_key(host) = {SCHEMA}.host_key($1) AND port = $2",
                            host,
                            port,
                        )
                return int(node_id)
            except CatalogError as exc:
                # Adding is idempotent, so one retry over a fresh connection is safe.
                if exc.sqlstate != "08006" or attempt:
                    raise
        raise AssertionError("unreachable")

    async def update_node(self, node_id: int, host: str, port: int) -> None:
        """Point node ``node_id`` at a new address (``citus_update_node``): its shards stay its own."""
        host, port = _check_address(host, port)
        async with self._change() as ch:
            updated = await ch.conn.fetchval(
                f"UPDATE {SCHEMA}.nodes SET host = $2, port = $3 WHERE node_id = $1 RETURNING node_id",
                node_id, host, port,
            )
            if updated is None:
                raise CatalogError("42704", f"node {node_id} is not in the cluster; see citus_nodes")

    async def remove_node(self, host: str, port: int) -> None:
        """Unregister a node (``citus_remove_node``); CatalogError 42704 if it is unknown."""
        host, port = _check_address(host, port)
        async with self._change() as ch:
            held = await ch.conn.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.placements p JOIN {SCHEMA}.nodes n USING (node_id) "
                "WHERE n.host = $1 AND n.port = $2",
                host,
                port,
            )
            if held:
                raise CatalogError(
                    "55000",
                    f"cannot remove node {host}:{port}: it holds {held} shard placement(s); "
                    "move them to other nodes first (undistribute or rebalance the tables)",
                )
            node_id = await ch.conn.fetchval(
                f"DELETE FROM {SCHEMA}.nodes WHERE host = $1 AND port = $2 RETURNING node_id",
                host,
                port,
            )
            if node_id is None:
                raise CatalogError(
                    "42704", f"node {host}:{port} is not in the cluster; see citus_nodes"
                )

    # ----------------------------------------------------------------------------------------
    # distributed and reference tables

    def colocation_for(
        self, dist_type: str, shard_count: int, colocate_with: str, search_path: Sequence[str] = ("public",)
    ) -> tuple[int | None, list[int]]:
        """Choose a colocation group and the node of each shard index (cached data, no I/O).

        ``colocate_with``: ``'default'`` joins the first group with the same type and shard count
        (or starts one), ``'none'`` always starts a new group, a table name joins that table's
        group. A new group spreads shards round-robin over the active nodes.
        """
        nodes = [n.node_id for n in self.nodes if n.is_active]
        if not nodes:
            raise CatalogError("55000", "the cluster has no active nodes; add one with citus_add_node")
        existing: TableInfo | None = None
        if colocate_with.lower() == "none":
            existing = None
        elif colocate_with.lower() == "default":
            candidates = sorted(
                (t for t in self.model.tables.values() if t.kind == "hash" and t.dist_type == dist_type and t.shard_count == shard_count),
                key=lambda t: t.colocation_id,
            )
            existing = candidates[0] if candidates else None
        else:
            schema, _, name = colocate_with.rpartition(".")
            existing = self.model.lookup(schema or None, name, tuple(search_path))
            if existing is None or existing.kind != "hash":
                raise CatalogError("42P01", f"cannot colocate with {colocate_with}: it is not a distributed table")
            if existing.dist_type != dist_type:
                raise CatalogError(
                    "22023",
                    f"cannot colocate with {colocate_with}: its distribution column has type {existing.dist_type}, not {dist_type}",
                )
            if existing.shard_count != shard_count:
                raise CatalogError(
                    "22023", f"cannot colocate with {colocate_with}: it has {existing.shard_count} shards, not {shard_count}"
                )
        if existing is not None:
            return existing.colocation_id, [s.node_ids[0] for s in existing.shards]
        return None, [nodes[i % len(nodes)] for i in range(shard_count)]

    async def allocate_shard_ids(self, count: int) -> list[int]:
        """New shard ids from the catalog's sequence (gaps are harmless)."""
        async with self._conn_lock:
            conn = await self._command_conn()
            rows = await conn.fetch(
                f"SELECT nextval('{SCHEMA}.shard_id_seq') FROM generate_series(1, $1)", count
            )
        return [int(r[0]) for r in rows]

    async def register_table(
        self,
        schema: str,
        name: str,
        kind: str,
        dist_column: str | None,
        dist_type: str | None,
        colocation_id: int | None,
        shards: list[tuple[int, int, list[int]]],
        fill: dict[str, str] | None = None,
        hypertable: HypertableSpec | None = None,
    ) -> int | None:
        """Record a distributed/reference table: ``shards`` are (shard id, index, node ids).

        With ``hypertable`` the table is also recorded as a hypertable; returns its id.
        """
        async with self._change() as ch:
            if await ch.conn.fetchval(
                f"SELECT 1 FROM {SCHEMA}.tables WHERE schema_name = $1 AND table_name = $2", schema, name
            ):
                raise CatalogError("42P16", f'table "{schema}.{name}" is already distributed')
            if kind == "hash" and colocation_id is None:
                colocation_id = await ch.conn.fetchval(
                    f"INSERT INTO {SCHEMA}.colocation_groups (shard_count, dist_type) VALUES ($1, $2) "
                    "RETURNING colocation_id",
                    len(shards),
                    dist_type,
                )
            await ch.conn.execute(
                f"INSERT INTO {SCHEMA}.tables (schema_name, table_name, kind, dist_column, dist_type, colocation_id, fill_columns) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
                schema, name, kind, dist_column, dist_type, colocation_id, json.dumps(fill or {}),
            )
            await ch.conn.executemany(
                f"INSERT INTO {SCHEMA}.shards (shard_id, schema_name, table_name, shard_index) VALUES ($1, $2, $3, $4)",
                [(sid, schema, name, idx) for sid, idx, _ in shards],
            )
            await ch.conn.executemany(
                f"INSERT INTO {SCHEMA}.placements (shard_id, node_id) VALUES ($1, $2)",
                [(sid, node) for sid, _, nodes in shards for node in nodes],
            )
            if hypertable is None:
                return None
            return await ch.conn.fetchval(
                f"INSERT INTO {SCHEMA}.hypertables (schema_name, table_name, time_column, time_type, "
                "chunk_interval, space_column, space_partitions) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "RETURNING hypertable_id",
                schema, name, hypertable.time_column, hypertable.time_type, hypertable.chunk_interval,
                hypertable.space_column, hypertable.space_partitions,
            )

    async def unregister_table(self, schema: str, name: str) -> None:
        async with self._change() as ch:
            await ch.conn.execute(f"DELETE FROM {SCHEMA}.shard_sizes WHERE shard_id IN (SELECT shard_id FROM {SCHEMA}.shards WHERE schema_name = $1 AND table_name = $2)", schema, name)
            await ch.conn.execute(f"DELETE FROM {SCHEMA}.tables WHERE schema_name = $1 AND table_name = $2", schema, name)

    async def rename_table(self, schema: str, old: str, new: str) -> None:
        async with self._change() as ch:
            await ch.conn.execute(
                f"UPDATE {SCHEMA}.tables SET table_name = $3 WHERE schema_name = $1 AND table_name = $2", schema, old, new
            )

    async def bump(self) -> None:
        """Announce a change made outside the catalog tables (e.g. a column added to a table)."""
        async with self._change():
            pass

    async def record_shard_sizes(self, sizes: list[tuple[int, int, int]]) -> None:
        """(shard id, node id, bytes) measured on the nodes, for citus_shards/citus_tables."""
        async with self._conn_lock:
            conn = await self._command_conn()
            await conn.executemany(
                f"INSERT INTO {SCHEMA}.shard_sizes (shard_id, node_id, size_bytes) VALUES ($1, $2, $3) "
                "ON CONFLICT (shard_id, node_id) DO UPDATE SET size_bytes = EXCLUDED.size_bytes, measured_at = now()",
                sizes,
            )

    # ----------------------------------------------------------------------------------------
    # hypertables and chunks

    async def add_chunk(
        self,
        schema: str,
        name: str,
        shard_index: int,
        value: int,
        create: Callable[[ChunkInfo, list[str]], Awaitable[None]],
    ) -> ChunkInfo:
        """The chunk of shard ``shard_index`` holding internal time ``value``; created if missing.

        Runs as one catalog change, so every proxy replica creating chunks is serialised: a
        second creator of the same range finds the first one's row and creates nothing. The
        range is computed here from the catalog as it is now (not a replica's cache).
        ``create(chunk, known_names)`` makes the table on the node before the row is committed;
        ``known_names`` are the shard's registered chunks, so a partition left by a creator
        that died between the node and the catalog can be recognised as an orphan.
        """
        async with self._change() as ch:
            h = await ch.conn.fetchrow(
                f"SELECT h.hypertable_id, h.chunk_interval, h.time_type, s.shard_id FROM {SCHEMA}.hypertables h "
                f"JOIN {SCHEMA}.shards s USING (schema_name, table_name) "
                "WHERE h.schema_name = $1 AND h.table_name = $2 AND s.shard_index = $3",
                schema, name, shard_index,
            )
            if h is None:
                raise CatalogError("42P01", f'"{schema}.{name}" is not a hypertable (or has no shard {shard_index})')
            rows = await ch.conn.fetch(
                f"SELECT chunk_id, range_start, range_end, schema_name, table_name, tier FROM {SCHEMA}.chunks "
                "WHERE hypertable_id = $1 AND shard_id = $2 ORDER BY range_start",
                h["hypertable_id"], h["shard_id"],
            )
            chunks = [
                ChunkInfo(r["chunk_id"], shard_index, r["range_start"], r["range_end"], r["schema_name"], r["table_name"], r["tier"])
                for r in rows
            ]
            current = HypertableInfo(h["hypertable_id"], "", h["time_type"], h["chunk_interval"], chunks=tuple(chunks))
            found = current.chunk_containing(shard_index, value)
            if found is not None:
                ch.changed = False
                return found
            lo, hi = current.new_chunk_range(shard_index, value)
            chunk_id = await ch.conn.fetchval(
                f"SELECT nextval(pg_get_serial_sequence('{SCHEMA}.chunks', 'chunk_id'))"
            )
            chunk = ChunkInfo(chunk_id, shard_index, lo, hi, CHUNK_SCHEMA, f"_hyper_{h['hypertable_id']}_{chunk_id}_chunk")
            await create(chunk, [c.name for c in chunks])
            await ch.conn.execute(
                f"INSERT INTO {SCHEMA}.chunks (chunk_id, hypertable_id, shard_id, range_start, range_end, "
                "schema_name, table_name) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                chunk_id, h["hypertable_id"], h["shard_id"], lo, hi, chunk.schema, chunk.name,
            )
            return chunk

    async def remove_chunks(self, chunk_ids: Sequence[int]) -> None:
        """Forget chunks (after their tables were dropped on the nodes)."""
        async with self._change() as ch:
            await ch.conn.execute(f"DELETE FROM {SCHEMA}.chunks WHERE chunk_id = ANY($1::int[])", list(chunk_ids))

    async def set_chunk_tier(self, chunk_id: int, tier: str) -> None:
        async with self._change() as ch:
            await ch.conn.execute(f"UPDATE {SCHEMA}.chunks SET tier = $2 WHERE chunk_id = $1", chunk_id, tier)

    async def set_chunk_interval(self, hypertable_id: int, interval: int) -> None:
        async with self._change() as ch:
            await ch.conn.execute(
                f"UPDATE {SCHEMA}.hypertables SET chunk_interval = $2 WHERE hypertable_id = $1", hypertable_id, interval
            )

    async def set_compression(self, hypertable_id: int, settings: dict | None) -> None:
        """Compression settings of a hypertable (None: compression disabled)."""
        async with self._change() as ch:
            await ch.conn.execute(
                f"UPDATE {SCHEMA}.hypertables SET compression = $2::jsonb WHERE hypertable_id = $1",
                hypertable_id, None if settings is None else json.dumps(settings),
            )

    @contextlib.asynccontextmanager
    async def _change(self) -> AsyncIterator[_Change]:
        """Run a catalog change as one transaction that bumps the version and notifies.

        The version row is locked first, which serialises every catalog writer in every process:
        checks made inside the body stay true until commit, and versions follow commit order.
        If the body sets ``changed = False`` the transaction commits without a bump (nothing to
        announce). Later catalog features (tables, shards, chunks) build their writes on this.
        """
        async with self._conn_lock:
            conn = await self._command_conn()
            try:
                async with conn.transaction():
                    await conn.execute(f"SELECT version FROM {SCHEMA}.catalog_version FOR UPDATE")
                    ch = _Change(conn)
                    yield ch
                    if ch.changed:
                        new_version = await conn.fetchval(
                            f"UPDATE {SCHEMA}.catalog_version SET version = version + 1 "
                            "RETURNING version"
                        )
                        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(new_version))
            except _CONNECTION_ERRORS as exc:
                raise _lost(exc) from exc
            except asyncpg.PostgresError as exc:
                raise _translate(exc) from exc
        await self.reload()

    # ----------------------------------------------------------------------------------------
    # reload and change notification

    def add_listener(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(new_version)`` in the loop whenever the cache changes version."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[int], None]) -> None:
        """Forget a callback registered with :meth:`add_listener`."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    async def reload(self) -> None:
        """Read the catalog again and swap the cache if the version moved."""
        for attempt in (0, 1):
            try:
                async with self._conn_lock:
                    conn = await self._command_conn()
                    snap = await self._read_snapshot(conn)
                    self._apply(snap)
                return
            except _CONNECTION_ERRORS as exc:
                # Reading is harmless to repeat; the second try reconnects.
                if attempt:
                    raise _lost(exc) from exc
            except asyncpg.PostgresError as exc:
                raise _translate(exc) from exc

    async def wait_for_version(self, version: int, timeout: float = 5.0) -> None:
        """Wait until the cache has reached ``version`` (TimeoutError otherwise); for tests."""
        deadline = time.monotonic() + timeout
        while self.version < version:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"catalog still at version {self.version}, wanted {version} after {timeout}s"
                )
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def _read_snapshot(self, conn: asyncpg.Connection) -> _Snapshot:
        """One consistent read of everything cached (repeatable read: one snapshot)."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            version = await conn.fetchval(f"SELECT version FROM {SCHEMA}.catalog_version")
            rows = await conn.fetch(
                f"SELECT node_id, host, port, is_active FROM {SCHEMA}.nodes ORDER BY node_id"
            )
            table_rows = await conn.fetch(
                f"SELECT schema_name, table_name, kind, dist_column, dist_type, colocation_id, "
                f"fill_columns::text AS fill_columns FROM {SCHEMA}.tables"
            )
            column_rows = await conn.fetch(
                f"SELECT t.schema_name, t.table_name, "
                f"array_agg(a.attname::text ORDER BY a.attnum) AS columns "
                f"FROM {SCHEMA}.tables t "
                "JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema_name "
                "JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.table_name "
                "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
                "GROUP BY 1, 2"
            )
            aggregate_names = frozenset(
                r[0] for r in await conn.fetch("SELECT DISTINCT proname::text FROM pg_catalog.pg_proc WHERE prokind = 'a'")
            )
            shard_rows = await conn.fetch(
                f"SELECT s.schema_name, s.table_name, s.shard_id, s.shard_index, "
                f"array_agg(p.node_id ORDER BY p.node_id) AS node_ids "
                f"FROM {SCHEMA}.shards s LEFT JOIN {SCHEMA}.placements p USING (shard_id) "
                f"GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 4"
            )
            hyper_rows = await conn.fetch(
                f"SELECT hypertable_id, schema_name, table_name, time_column, time_type, chunk_interval, "
                f"space_column, space_partitions, compression::text AS compression FROM {SCHEMA}.hypertables"
            )
            chunk_rows = await conn.fetch(
                f"SELECT c.chunk_id, c.hypertable_id, s.shard_index, c.range_start, c.range_end, "
                f"c.schema_name, c.table_name, c.tier FROM {SCHEMA}.chunks c "
                f"JOIN {SCHEMA}.shards s USING (shard_id) ORDER BY c.range_start, s.shard_index"
            )
            cagg_rows = await conn.fetch(f"SELECT view_schema, view_name FROM {SCHEMA}.continuous_aggregates")
        hypertables = _hypertables(hyper_rows, chunk_rows)
        shards_by_table: dict[tuple[str, str], list[Shard]] = {}
        for r in shard_rows:
            node_ids = tuple(n for n in r["node_ids"] if n is not None)
            shards_by_table.setdefault((r["schema_name"], r["table_name"]), []).append(
                Shard(int(r["shard_id"]), int(r["shard_index"]), node_ids)
            )
        columns = {(r["schema_name"], r["table_name"]): tuple(r["columns"]) for r in column_rows}
        tables = {
            (r["schema_name"], r["table_name"]): TableInfo(
                schema=r["schema_name"],
                name=r["table_name"],
                kind=r["kind"],
                dist_column=r["dist_column"],
                dist_type=r["dist_type"],
                colocation_id=r["colocation_id"] or 0,
                shards=tuple(shards_by_table.get((r["schema_name"], r["table_name"]), ())),
                columns=columns.get((r["schema_name"], r["table_name"]), ()),
                fill=json.loads(r["fill_columns"] or "{}"),
                hypertable=hypertables.get((r["schema_name"], r["table_name"])),
            )
            for r in table_rows
        }
        nodes = tuple(
            NodeInfo(
                node_id=r["node_id"],
                host=r["host"],
                port=r["port"],
                is_active=r["is_active"],
                is_metadata=self.is_metadata_address(r["host"], r["port"]),
            )
            for r in rows
        )
        return _Snapshot(
            version=int(version), nodes=nodes, tables=tables, aggregate_names=aggregate_names,
            caggs=frozenset((r["view_schema"], r["view_name"]) for r in cagg_rows),
        )

    def _apply(self, snap: _Snapshot) -> None:
        """Swap in a snapshot; wake waiters and call listeners if the version changed."""
        first = self.version == 0
        changed = snap.version != self.version
        self.nodes = list(snap.nodes)
        self._by_id = {n.node_id: n for n in snap.nodes}
        self.model = ClusterModel(
            snap.version, snap.tables, tuple(n.node_id for n in snap.nodes), snap.aggregate_names
        )
        self.caggs = snap.caggs
        self.version = snap.version
        if not changed:
            return
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        if first:
            return
        for cb in list(self._listeners):
            try:
                cb(snap.version)
            except Exception:
                log.exception("catalog listener %r failed for version %d", cb, snap.version)

    def _schedule_reload(self) -> None:
        """Reload soon in the background; bursts of notifications collapse into few reloads."""
        if self._closing:
            return
        self._reload_pending = True
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.get_running_loop().create_task(
                self._reload_loop(), name="orochi-catalog-reload"
            )

    async def _reload_loop(self) -> None:
        while self._reload_pending and not self._closing:
            self._reload_pending = False
            try:
                await self.reload()
            except Exception as exc:
                # The listen loop's poll will try again; a proxy must not die of this.
                log.warning("catalog reload failed (%s); will retry", exc)
                return

    def _on_notify(self, _conn: asyncpg.Connection, _pid: int, _channel: str, payload: str) -> None:
        try:
            announced = int(payload)
        except ValueError:
            announced = None
        if announced is not None and announced <= self.version:
            return  # our own change, already loaded
        self._schedule_reload()

    async def _connect_listener(self) -> asyncpg.Connection:
        conn = await self._connect()
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        self._listen_conn = conn
        return conn

    async def _listen_loop(self, conn: asyncpg.Connection | None) -> None:
        """Keep a LISTEN connection alive forever; reconnect with backoff and catch up.

        asyncpg does not call termination listeners when the server drops the socket, so the loop
        checks ``is_closed()`` often (cheap, local) and queries the version every
        ``poll_interval`` (finds half-open connections and notifications missed while away).
        """
        backoff = 0.1
        check = min(0.2, self.poll_interval)
        while not self._closing:
            try:
                if conn is None:
                    conn = await self._connect_listener()
                    log.warning("catalog listener reconnected to the metadata database")
                    backoff = 0.1
                    self._schedule_reload()  # catch up on what we missed while away
                last_poll = time.monotonic()
                while not self._closing:
                    await asyncio.sleep(check)
                    if conn.is_closed():
                        raise ConnectionError("LISTEN connection closed")
                    if time.monotonic() - last_poll >= self.poll_interval:
                        last_poll = time.monotonic()
                        current = await asyncio.wait_for(
                            conn.fetchval(f"SELECT version FROM {SCHEMA}.catalog_version"),
                            timeout=max(self.poll_interval, 1.0),
                        )
                        if current != self.version:
                            self._schedule_reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    break
                log.warning(
                    "catalog listener lost its connection (%s); reconnecting in %.1fs",
                    exc or type(exc).__name__,
                    backoff,
                )
                if conn is not None:
                    conn.terminate()
                conn = None
                self._listen_conn = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    # ----------------------------------------------------------------------------------------
    # connections

    async def _command_conn(self) -> asyncpg.Connection:
        """The connection for reads and writes, reopened if the server dropped it."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._connect()
        return self._conn

    async def _connect(self) -> asyncpg.Connection:
        """Open a connection to the metadata database; CatalogError with a clear cause if not."""
        try:
            return await asyncpg.connect(**self._connect_kwargs)
        except asyncpg.PostgresError as exc:
            raise _translate(exc) from exc
        except (OSError, TimeoutError) as exc:
            raise CatalogError(
                "08006",
                f"cannot connect to the metadata database at {self.metadata_host}:"
                f"{self.metadata_port}: {exc}",
            ) from exc

    async def _record_metadata_node(self, conn: asyncpg.Connection) -> None:
        """Store the configured metadata address for the SQL views (no write if unchanged)."""
        await conn.execute(
            f"""
            INSERT INTO {SCHEMA}.metadata_node (singleton, host, port) VALUES (true, $1, $2)
            ON CONFLICT (singleton) DO UPDATE SET host = EXCLUDED.host, port = EXCLUDED.port
            WHERE {SCHEMA}.host_key(metadata_node.host) <> {SCHEMA}.host_key(EXCLUDED.host)
               OR metadata_node.port <> EXCLUDED.port
            """,
            self.metadata_host,
            self.metadata_port,
        )

    # ----------------------------------------------------------------------------------------
    # control-plane connections

    async def connect(self) -> asyncpg.Connection:
        """A new connection to the metadata database, for work that needs its own session.

        The job runner holds a job's lease (an advisory lock) for the length of a run on such
        a connection, and the scheduler its leadership; the caller closes it.
        """
        return await self._connect()

    async def record_chunk_size(self, chunk_id: int, size_bytes: int) -> None:
        """A chunk's size just before compression moved its rows (chunk_compression_stats'
        "before" side: it cannot be measured once the rows are segments). Not cached, so no
        version bump; the version row lock still orders it with the other catalog writes."""
        async with self._change() as ch:
            await ch.conn.execute(f"UPDATE {SCHEMA}.chunks SET size_bytes = $2 WHERE chunk_id = $1", chunk_id, size_bytes)
            ch.changed = False


def _hypertables(hyper_rows, chunk_rows) -> dict[tuple[str, str], HypertableInfo]:
    """Hypertable descriptions by (schema, table), each with its chunks in time order."""
    chunks: dict[int, list[ChunkInfo]] = {}
    for r in chunk_rows:
        chunks.setdefault(r["hypertable_id"], []).append(
            ChunkInfo(
                int(r["chunk_id"]), int(r["shard_index"]), int(r["range_start"]), int(r["range_end"]),
                r["schema_name"], r["table_name"], r["tier"],
            )
        )
    return {
        (r["schema_name"], r["table_name"]): HypertableInfo(
            hypertable_id=int(r["hypertable_id"]),
            time_column=r["time_column"],
            time_type=r["time_type"],
            chunk_interval=int(r["chunk_interval"]),
            space_column=r["space_column"],
            space_partitions=r["space_partitions"],
            chunks=tuple(chunks.get(r["hypertable_id"], ())),
            compression=json.loads(r["compression"]) if r["compression"] else None,
        )
        for r in hyper_rows
    }


def _check_address(host: str, port: int) -> tuple[str, int]:
    """Validate a node address from SQL or the CLI; CatalogError 22023 if it is unusable."""
    if not isinstance(host, str) or not host.strip():
        raise CatalogError("22023", "node name must not be empty")
    try:
        p = int(port)
    except (TypeError, ValueError):
        raise CatalogError("22023", f"node port must be an integer, not {port!r}") from None
    if not 1 <= p <= 65535:
        raise CatalogError("22023", f"node port {p} is out of range (1-65535)")
    return host.strip(), p


def _translate(exc: asyncpg.PostgresError) -> CatalogError:
    """Turn a metadata-database error into a CatalogError that keeps its SQLSTATE."""
    sqlstate = getattr(exc, "sqlstate", None) or "XX000"
    return CatalogError(sqlstate, f"catalog error in the metadata database: {exc}")


def _lost(exc: BaseException) -> CatalogError:
    return CatalogError(
        "08006", f"lost the connection to the metadata database ({exc or type(exc).__name__})"
    )
