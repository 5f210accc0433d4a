"""Hypertables through the proxy: create_hypertable, chunks on insert/COPY, pruning, chunk admin.

Checked on the nodes directly (partitions of the shard tables, their bounds) and against the
catalog views; tables are named ``ht_*`` (unique to this module).
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator

import psycopg
import pytest
from clusterenv import ClusterEnv
from proxyproc import ProxyProcess

from orochi_proxy.localcluster import LocalCluster


class Env(ClusterEnv):
    def partitions(self, table: str) -> list[tuple[str, str]]:
        """(chunk name, bound) of every partition of the hypertable's shards, on all nodes."""
        out = []
        for node in self.nodes:
            out += node.execute(
                "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
                "WHERE p.relname LIKE %s AND c.relkind = 'r' ORDER BY 1",
                (f"{table}\\_%",),
            ).fetchall()
        return sorted(out)


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, proxy: ProxyProcess) -> Iterator[Env]:
    e = Env(proxy, cluster)
    e.register_nodes()
    try:
        yield e
    finally:
        for (name,) in e.q("SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_name LIKE 'ht\\_%'"):
            e.q(f"DROP TABLE IF EXISTS {name}")
        e.close()


def sqlstate(exc: BaseException) -> str | None:
    return getattr(getattr(exc, "diag", None), "sqlstate", None)


def chunk_names(env: Env, table: str) -> list[str]:
    return [r[0] for r in env.q(
        "SELECT chunk_name FROM timescaledb_information.chunks WHERE hypertable_name = %s ORDER BY range_start, chunk_name", (table,)
    )]


def test_create_hypertable_classic_form_and_chunks_on_insert(env: Env) -> None:
    env.q("CREATE TABLE ht_basic (time timestamptz, device int, value float8)")
    (row,) = env.q("SELECT * FROM create_hypertable('ht_basic', 'time', chunk_time_interval => INTERVAL '1 day')")
    assert row[1:] == ("public", "ht_basic", True)
    (record,) = env.q("SELECT create_hypertable('ht_basic', 'time', if_not_exists => true)")
    assert record[0] == (str(row[0]), "public", "ht_basic", "f")  # a composite, as TimescaleDB returns
    # create_hypertable made the time column NOT NULL and added TimescaleDB's default index.
    assert env.q("SELECT attnotnull FROM pg_attribute WHERE attrelid = 'ht_basic'::regclass AND attname = 'time'") == [(True,)]
    assert env.q("SELECT count(*) FROM pg_indexes WHERE tablename = 'ht_basic' AND indexname = 'ht_basic_time_idx'") == [(1,)]
    env.q(
        "INSERT INTO ht_basic VALUES ('2024-01-01 10:00+00', 1, 1.5), ('2024-01-02 10:00+00', 2, 2.5), "
        "('2024-01-02 11:00+00', 3, 3.5)"
    )
    env.q("INSERT INTO ht_basic VALUES (now(), 4, 4.5)")
    with env.connect(autocommit=True) as c:
        c.execute("INSERT INTO ht_basic VALUES (%s, %s, %s)", ("2024-01-01 23:59:59.999999+00", 5, 5.5))
    parts = env.partitions("ht_basic")
    bounds = sorted(p[1] for p in parts)
    assert bounds[:2] == [
        "FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-01-02 00:00:00+00')",
        "FOR VALUES FROM ('2024-01-02 00:00:00+00') TO ('2024-01-03 00:00:00+00')",
    ]
    assert len(parts) == 3
    assert sorted(p[0] for p in parts) == sorted(chunk_names(env, "ht_basic"))
    assert env.q("SELECT count(*), sum(value) FROM ht_basic") == [(5, 17.5)]
    assert env.q("SELECT device FROM ht_basic WHERE time >= '2024-01-02' AND time < '2024-01-03' ORDER BY device") == [(2,), (3,)]
    # The now() row holds the value the proxy routed it by: within a minute of the node's clock.
    assert env.q("SELECT abs(extract(epoch FROM now() - time)) < 60 FROM ht_basic WHERE device = 4") == [(True,)]
    # The chunk indexes exist on the node (ATTACH PARTITION created them).
    node_idx = sum(n.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = '_timescaledb_internal'").fetchone()[0] for n in env.nodes)
    assert node_idx >= 3


def test_new_form_by_range_and_integer_time(env: Env) -> None:
    env.q("CREATE TABLE ht_int (t bigint NOT NULL, v int)")
    with pytest.raises(psycopg.Error) as err:
        env.q("SELECT create_hypertable('ht_int', by_range('t'))")
    assert "explicit interval" in str(err.value)
    (row,) = env.q("SELECT * FROM create_hypertable('ht_int', by_range('t', 1000))")
    assert row[1] is True and len(row) == 2
    env.q("INSERT INTO ht_int SELECT g, g FROM generate_series(0, 4999, 7) g")
    assert len(chunk_names(env, "ht_int")) == 5
    assert env.q("SELECT range_start_integer, range_end_integer FROM timescaledb_information.chunks "
                 "WHERE hypertable_name = 'ht_int' ORDER BY 1 LIMIT 2") == [(0, 1000), (1000, 2000)]
    assert env.q("SELECT count(*), sum(v) FROM ht_int WHERE t >= 1000 AND t < 3000") == [
        (len(range(1001, 3000, 7)), sum(range(1001, 3000, 7)))
    ]


def test_space_partitioned_hypertable_spreads_over_nodes(env: Env) -> None:
    env.q("CREATE TABLE ht_space (time timestamptz NOT NULL, device int NOT NULL, value float8)")
    env.q("SELECT create_hypertable('ht_space', 'time', 'device', 4, chunk_time_interval => INTERVAL '7 days')")
    env.q(
        "INSERT INTO ht_space SELECT timestamptz '2024-03-01' + g * interval '1 hour', g % 10, g "
        "FROM generate_series(0, 999) g"
    )
    chunks = env.q("SELECT node_id, count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'ht_space' GROUP BY 1")
    assert len(chunks) == len(env.nodes)  # 4 space partitions round-robin over 3 nodes
    assert env.q("SELECT device, count(*) FROM ht_space GROUP BY device ORDER BY device") == [(d, 100) for d in range(10)]
    dims = env.q("SELECT dimension_type, column_name, num_partitions FROM timescaledb_information.dimensions "
                 "WHERE hypertable_name = 'ht_space' ORDER BY dimension_number")
    assert dims == [("Time", "time", None), ("Space", "device", 4)]


def test_copy_creates_chunks_text_csv_and_binary(env: Env) -> None:
    env.q("CREATE TABLE ht_copy (device int, time timestamptz NOT NULL, value float8)")
    env.q("SELECT create_hypertable('ht_copy', by_range('time', INTERVAL '1 day'))")
    with env.connect(autocommit=True) as c:
        with c.cursor().copy("COPY ht_copy FROM STDIN") as cp:
            for i in range(48):
                cp.write_row((i, f"2024-05-01 {i % 24:02d}:30:00+00" if i < 24 else f"2024-05-02 {i % 24:02d}:30:00+00", i))
        with c.cursor().copy("COPY ht_copy (device, time, value) FROM STDIN (FORMAT csv)") as cp:
            cp.write("100,2024-05-03 01:00:00+00,1\n101,\"2024-05-04 01:00:00+00\",2\n")
        import datetime

        with c.cursor().copy("COPY ht_copy FROM STDIN (FORMAT binary)") as cp:
            cp.set_types(["int4", "timestamptz", "float8"])
            cp.write_row((200, datetime.datetime(2024, 5, 5, 12, tzinfo=datetime.UTC), 3.0))
    assert len(chunk_names(env, "ht_copy")) == 5
    assert env.q("SELECT count(*) FROM ht_copy") == [(51,)]
    assert env.q("SELECT device FROM ht_copy WHERE time >= '2024-05-05' ORDER BY 1") == [(200,)]


@pytest.mark.parametrize("session_tz", ["UTC", "Pacific/Kiritimati", "Etc/GMT+12"])
@pytest.mark.parametrize("time_type", ["timestamptz", "timestamp"])
def test_copy_rows_far_from_utc_land_in_the_right_chunks(env: Env, time_type: str, session_tz: str) -> None:
    """COPY notes most rows by their calendar day and zone suffix alone once those lie inside
    an existing chunk. Per day of a chunk and per zone spelling, a first row inside the chunk,
    then one that may fall outside: at UTC+14 just after midnight of the chunk's first day (the
    chunk before), at UTC-12 just before midnight of its last day (the chunk after). Those
    chunks do not exist yet and no other row of the same load needs them; they must still be
    created (or the node refuses the row), and every row must read back as PostgreSQL converts
    its text. Texts without a zone are in the session's TimeZone (UTC+14 and UTC-12 among them)."""
    spellings = {
        "offsets": ["12:00:00+00", "23:00:00+14:00", "00:00:01+14:00", "00:00:00-12:00", "23:59:59-12:00"],
        "names": ["20:00:00 Pacific/Kiritimati", "00:00:30 Pacific/Kiritimati",  # UTC+14
                  "06:00:00 Etc/GMT+12", "23:59:00 Etc/GMT+12"],  # UTC-12, despite the '+'
        # The first time lies on the same day in UTC, so inside the chunk, in each session zone.
        "session": [{"UTC": "12:00:00", "Pacific/Kiritimati": "20:00:00", "Etc/GMT+12": "06:00:00"}[session_tz],
                    "00:00:30", "23:59:30", "24:00:00"],
    }
    for label, times in spellings.items():
        t = f"ht_far_{label}_{time_type}_{session_tz.replace('/', '_').replace('+', 'p').lower()}"
        env.q(f"CREATE TABLE {t} (time {time_type} NOT NULL, n int)")
        env.q(f"SELECT create_hypertable('{t}', by_range('time', INTERVAL '7 days'))")
        with env.connect(autocommit=True) as c:
            c.execute(f"SET TimeZone = '{session_tz}'")
            with c.cursor().copy(f"COPY {t} FROM STDIN") as cp:
                cp.write_row(("2024-03-11 12:00:00+00", 0))
            lo, hi = c.execute(
                "SELECT range_start, range_end FROM timescaledb_information.chunks WHERE hypertable_name = %s", (t,)
            ).fetchone()
            if lo.tzinfo is not None:  # the chunk's days in UTC, where its bounds are midnights
                lo, hi = lo.astimezone(datetime.UTC), hi.astimezone(datetime.UTC)
            days = [(lo + datetime.timedelta(days=k)).strftime("%Y-%m-%d") for k in range((hi - lo).days)]
            rows = [f"{d} {tm}" for d in days for tm in times]
            with c.cursor().copy(f"COPY {t} FROM STDIN") as cp:
                for i, r in enumerate(rows, 1):
                    cp.write_row((r, i))
            got = [r[0] for r in c.execute(f"SELECT time FROM {t} ORDER BY n").fetchall()]
            want = [r[0] for r in c.execute(
                f"SELECT v::{time_type} FROM unnest(%s::text[]) WITH ORDINALITY AS u(v, n) ORDER BY n",
                (["2024-03-11 12:00:00+00", *rows],),
            ).fetchall()]
        assert got == want, label


def test_concurrent_inserts_into_a_new_range_create_one_chunk(env: Env) -> None:
    env.q("CREATE TABLE ht_race (time timestamptz NOT NULL, k int)")
    env.q("SELECT create_hypertable('ht_race', 'time', chunk_time_interval => INTERVAL '1 hour')")
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(k: int) -> None:
        try:
            with env.connect(autocommit=True) as c:
                barrier.wait()
                for minute in range(0, 60, 10):
                    c.execute("INSERT INTO ht_race VALUES (%s, %s)", (f"2024-07-01 10:{minute:02d}:00+00", k))
                    c.execute("INSERT INTO ht_race VALUES (%s, %s)", (f"2024-07-01 11:{minute:02d}:00+00", k))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(chunk_names(env, "ht_race")) == 2
    assert len(env.partitions("ht_race")) == 2
    assert env.q("SELECT count(*), count(DISTINCT k) FROM ht_race") == [(96, 8)]


def test_chunk_exclusion_and_explain(env: Env) -> None:
    env.q("CREATE TABLE ht_prune (time timestamptz NOT NULL, device int NOT NULL, v int)")
    env.q("SELECT create_hypertable('ht_prune', 'time', 'device', 3, chunk_time_interval => INTERVAL '1 day')")
    # device 0..2 -> some shards; days 1..10 of June
    env.q("INSERT INTO ht_prune SELECT timestamptz '2024-06-01' + d * interval '1 day' + interval '1 hour', dev, d "
          "FROM generate_series(0, 9) d, generate_series(0, 2) dev")
    plan = "\n".join(r[0] for r in env.q("EXPLAIN SELECT count(*) FROM ht_prune WHERE time >= '2024-06-03' AND time < '2024-06-05'"))
    total = len(chunk_names(env, "ht_prune"))
    assert total % 10 == 0  # ten days on each shard that holds a device
    assert f"Chunks: {2 * total // 10} of {total} (excluded by time)" in plan, plan
    assert env.q("SELECT count(*), sum(v) FROM ht_prune WHERE time >= '2024-06-03' AND time < '2024-06-05'") == [(6, 15)]
    with env.connect(autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM ht_prune WHERE time BETWEEN %s AND %s", ("2024-06-09", "2024-06-20")).fetchone() == (6,)
    # Nothing in range: the answer still has its shape.
    assert env.q("SELECT count(*), max(v) FROM ht_prune WHERE time < '2020-01-01'") == [(0, None)]
    plan = "\n".join(r[0] for r in env.q("EXPLAIN SELECT * FROM ht_prune WHERE time > now() - interval '1 hour'"))
    assert "Chunks: 0 of" in plan, plan


def test_show_and_drop_chunks(env: Env) -> None:
    env.q("CREATE TABLE ht_drop (time timestamptz NOT NULL, v int)")
    env.q("SELECT create_hypertable('ht_drop', 'time', chunk_time_interval => INTERVAL '1 day')")
    env.q("INSERT INTO ht_drop SELECT now() - g * interval '1 day', g FROM generate_series(0, 9) g")
    all_chunks = [r[0] for r in env.q("SELECT show_chunks('ht_drop')")]
    assert len(all_chunks) >= 10
    old = [r[0] for r in env.q("SELECT show_chunks('ht_drop', older_than => INTERVAL '5 days')")]
    assert 4 <= len(old) <= 5
    dropped = [r[0] for r in env.q("SELECT drop_chunks('ht_drop', INTERVAL '5 days')")]
    assert dropped == old
    assert sorted(r[0] for r in env.q("SELECT show_chunks('ht_drop')")) == sorted(set(all_chunks) - set(old))
    # Only whole chunks older than the cut-off went: rows of the last 5 days are all there.
    assert env.q("SELECT min(v), max(v) FROM ht_drop") == [(0, 10 - len(old) - 1)]
    for name in old:
        assert not any(n.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] for n in env.nodes)
    with pytest.raises(psycopg.Error) as err:
        env.q("SELECT drop_chunks('ht_drop')")
    assert sqlstate(err.value) == "22023"


def test_insert_in_a_transaction_block_creates_chunks(env: Env) -> None:
    env.q("CREATE TABLE ht_block (time timestamptz NOT NULL, v int)")
    env.q("SELECT create_hypertable('ht_block', 'time', chunk_time_interval => INTERVAL '1 day')")
    with env.connect() as c:
        c.execute("INSERT INTO ht_block VALUES ('2024-02-01 00:00+00', 1)")
        c.execute("INSERT INTO ht_block VALUES ('2024-02-02 00:00+00', 2)")  # new chunk while the block writes the shard
        c.rollback()
    assert env.q("SELECT count(*) FROM ht_block") == [(0,)]
    with env.connect() as c:
        c.execute("INSERT INTO ht_block VALUES ('2024-02-01 00:00+00', 1)")
        c.execute("INSERT INTO ht_block VALUES ('2024-02-03 00:00+00', 3)")
        c.commit()
    assert env.q("SELECT v FROM ht_block ORDER BY time") == [(1,), (3,)]


def test_compression_keeps_answers_and_skips_segments(env: Env) -> None:
    env.q("CREATE TABLE ht_comp (time timestamptz NOT NULL, device int NOT NULL, cpu float8, note text)")
    env.q("SELECT create_hypertable('ht_comp', 'time', 'device', 2, chunk_time_interval => INTERVAL '1 day')")
    env.q(
        "INSERT INTO ht_comp SELECT timestamptz '2024-08-01' + g * interval '1 minute', g % 5, "
        "CASE WHEN g % 97 = 0 THEN NULL ELSE (g % 100) / 10.0 END, CASE WHEN g % 7 = 0 THEN 'x' END "
        "FROM generate_series(0, 3 * 1440 - 1) g"
    )
    queries = [
        "SELECT count(*), round(sum(cpu)::numeric, 6), count(note) FROM ht_comp",  # float sums depend on order
        "SELECT device, count(*), round(avg(cpu)::numeric, 6), max(time) FROM ht_comp GROUP BY device ORDER BY device",
        "SELECT time_bucket('6 hours', time) AS b, count(*), min(cpu) FROM ht_comp GROUP BY b ORDER BY b",
        "SELECT * FROM ht_comp WHERE time >= '2024-08-02 10:00+00' AND time < '2024-08-02 10:30+00' ORDER BY time",
        "SELECT DISTINCT ON (device) device, time, cpu FROM ht_comp ORDER BY device, time DESC",
        "SELECT * FROM ht_comp ORDER BY time DESC LIMIT 7",
    ]
    before = [env.q(q) for q in queries]
    with pytest.raises(psycopg.Error) as err:
        env.q(f"SELECT compress_chunk('{chunk_names(env, 'ht_comp')[0]}')")
    assert "compression not enabled" in str(err.value)
    env.q("ALTER TABLE ht_comp SET (timescaledb.compress, timescaledb.compress_segmentby = 'device', timescaledb.compress_orderby = 'time DESC')")
    # Compress the first two days (all their chunks, every space partition).
    old = [r[0] for r in env.q("SELECT show_chunks('ht_comp', older_than => '2024-08-03 00:00+00')")]
    assert old
    for name in old:
        assert env.q(f"SELECT compress_chunk('{name}')") == [(name,)]
    assert env.q("SELECT count(*) FILTER (WHERE is_compressed), count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'ht_comp'")[0][0] == len(old)
    for name in old:  # the heap is empty; the rows are in segments on the node
        short = name.split(".")[-1]
        heap = sum(n.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for n in env.nodes if n.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0])
        segs = sum(n.execute(f"SELECT count(*) FROM _timescaledb_internal.{short}_compressed").fetchone()[0]
                   for n in env.nodes if n.execute("SELECT to_regclass(%s)", (f"_timescaledb_internal.{short}_compressed",)).fetchone()[0])
        assert heap == 0 and segs > 0
    after = [env.q(q) for q in queries]
    assert after == before
    # A narrow range reads one compressed day and skips the segments outside it (EXPLAIN ANALYZE).
    plan = "\n".join(r[0] for r in env.q("EXPLAIN SELECT count(*) FROM ht_comp WHERE time >= '2024-08-01 01:00+00' AND time < '2024-08-01 02:00+00'"))
    assert "_compressed" in plan and ("_min_time" in plan or "_max_time" in plan), plan
    # Rows inserted into a compressed chunk's range land in its heap and are read too.
    env.q("INSERT INTO ht_comp VALUES ('2024-08-01 00:00:30+00', 1, 42.0, 'late')")
    assert env.q("SELECT count(*) FROM ht_comp WHERE note = 'late'") == [(1,)]
    assert env.q("SELECT count(*) FROM ht_comp")[0][0] == before[0][0][0] + 1
    # UPDATE/DELETE touching compressed chunks are refused, not half-applied.
    with pytest.raises(psycopg.Error) as err:
        env.q("DELETE FROM ht_comp WHERE time < '2024-08-01 12:00+00'")
    assert sqlstate(err.value) == "0A000"
    env.q("DELETE FROM ht_comp WHERE time >= '2024-08-03 12:00+00'")  # hot chunks only: fine
    # Decompressing restores the plain chunk.
    for name in old:
        assert env.q(f"SELECT decompress_chunk('{name}')") == [(name,)]
    assert env.q("SELECT count(*) FILTER (WHERE is_compressed) FROM timescaledb_information.chunks WHERE hypertable_name = 'ht_comp'") == [(0,)]
    assert env.q("SELECT count(*) FROM ht_comp WHERE time < '2024-08-03'") == [(2 * 1440 + 1,)]


@pytest.mark.parametrize("step", ["compress_created", "compress_marked", "decompress_moved"])
def test_crash_during_compression_leaves_correct_data(
    env: Env, cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory, step: str
) -> None:
    """kill -9 of the proxy between the steps of compress_chunk / decompress_chunk: the data
    stays readable and right through another proxy, and the operation can be run again."""
    from proxyproc import start_proxy

    table = f"ht_crash_{step}"
    env.q(f"CREATE TABLE {table} (time timestamptz NOT NULL, device int NOT NULL, v float8)")
    env.q(f"SELECT create_hypertable('{table}', 'time', chunk_time_interval => INTERVAL '1 day')")
    env.q(f"INSERT INTO {table} SELECT timestamptz '2024-09-01' + g * interval '10 seconds', g % 4, g FROM generate_series(0, 8639) g")
    env.q(f"ALTER TABLE {table} SET (timescaledb.compress, timescaledb.compress_segmentby = 'device')")
    (chunk,) = [r[0] for r in env.q(f"SELECT show_chunks('{table}')")]
    check = f"SELECT count(*), sum(v), min(time), max(time), count(DISTINCT device) FROM {table}"
    expected = env.q(check)
    if step == "decompress_moved":
        env.q(f"SELECT compress_chunk('{chunk}')")
    crashing = start_proxy(tmp_path_factory.mktemp("crash"), cluster, name=f"crash_{step}", env={"OROCHI_FAULT": f"{step}:kill"})
    try:
        with pytest.raises(psycopg.OperationalError):
            with psycopg.connect(crashing.dsn(), autocommit=True) as c:
                fn = "decompress_chunk" if step.startswith("decompress") else "compress_chunk"
                c.execute(f"SELECT {fn}('{chunk}')")
        assert crashing.process.wait(timeout=10) != 0
    finally:
        crashing.stop()
    env.q("SELECT 1")  # the main proxy reloads the catalog on the change notification
    assert env.q(check) == expected
    assert env.q(f"SELECT v FROM {table} WHERE time = '2024-09-01 12:00:00+00'") == [(4320.0,)]
    # Finishing the job from another proxy works and keeps the answer.
    env.q(f"SELECT compress_chunk('{chunk}')")
    assert env.q(check) == expected
    env.q(f"SELECT decompress_chunk('{chunk}')")
    assert env.q(check) == expected


def test_retention_and_compression_policies_run_as_jobs(env: Env) -> None:
    """add_*_policy schedule jobs that the proxy's scheduler runs at once (first run due now)."""
    import time

    env.q("CREATE TABLE ht_pol (time timestamptz NOT NULL, device int NOT NULL, v float8)")
    env.q("SELECT create_hypertable('ht_pol', 'time', chunk_time_interval => INTERVAL '1 day')")
    env.q("INSERT INTO ht_pol SELECT now() - g * interval '1 hour', g % 3, g FROM generate_series(0, 10 * 24 - 1) g")
    rows_before = env.q("SELECT time, device, v FROM ht_pol ORDER BY time")
    env.q("ALTER TABLE ht_pol SET (timescaledb.compress, timescaledb.compress_segmentby = 'device')")
    with pytest.raises(psycopg.Error):
        env.q("SELECT add_retention_policy('ht_pol')")  # drop_after is required
    (retention,) = env.q("SELECT add_retention_policy('ht_pol', INTERVAL '7 days')")[0]
    (compression,) = env.q("SELECT add_compression_policy('ht_pol', compress_after => INTERVAL '2 days')")[0]
    with pytest.raises(psycopg.Error) as err:
        env.q("SELECT add_retention_policy('ht_pol', INTERVAL '1 day')")
    assert sqlstate(err.value) == "42710"
    assert env.q("SELECT add_retention_policy('ht_pol', INTERVAL '1 day', if_not_exists => true)") == [(-1,)]
    jobs = env.q("SELECT proc_name, hypertable_name FROM timescaledb_information.jobs WHERE hypertable_name = 'ht_pol' ORDER BY job_id")
    assert jobs == [("policy_retention", "ht_pol"), ("policy_compression", "ht_pol")]
    deadline = time.monotonic() + 60
    stats: list = []
    while time.monotonic() < deadline:
        stats = env.q(
            f"SELECT job_id, last_run_status, total_successes FROM timescaledb_information.job_stats "
            f"WHERE job_id IN ({retention}, {compression}) ORDER BY job_id"
        )
        if len(stats) == 2 and all(s[2] and s[2] >= 1 for s in stats):
            break
        time.sleep(0.5)
    assert [(s[0], s[1]) for s in stats] == [(retention, "Success"), (compression, "Success")], stats
    env.q("SELECT 1")
    chunks = env.q("SELECT range_start, range_end, is_compressed, now() FROM timescaledb_information.chunks WHERE hypertable_name = 'ht_pol'")
    now = chunks[0][3]
    import datetime as dt

    assert all(r[1] > now - dt.timedelta(days=7) for r in chunks)  # older chunks dropped
    assert all(r[2] == (r[1] <= now - dt.timedelta(days=2)) for r in chunks if r[1] <= now - dt.timedelta(days=2, minutes=-1) or r[1] > now - dt.timedelta(days=2, minutes=1))
    assert sum(1 for r in chunks if r[2]) >= 4
    oldest = min(r[0] for r in chunks)
    assert env.q("SELECT time, device, v FROM ht_pol ORDER BY time") == [r for r in rows_before if r[0] >= oldest]
    env.q("SELECT remove_retention_policy('ht_pol')")
    assert env.q("SELECT remove_compression_policy('ht_pol')") == [(True,)]
    assert env.q("SELECT remove_compression_policy('ht_pol', if_exists => true)") == [(False,)]
    assert env.q("SELECT count(*) FROM timescaledb_information.jobs WHERE hypertable_name = 'ht_pol'") == [(0,)]


def test_continuous_aggregate_materializes_the_rollup(env: Env) -> None:
    env.q("CREATE TABLE ht_cagg (time timestamptz NOT NULL, device int NOT NULL, v float8)")
    env.q("SELECT create_hypertable('ht_cagg', 'time', 'device', 3, chunk_time_interval => INTERVAL '1 day')")
    env.q("INSERT INTO ht_cagg SELECT timestamptz '2024-10-01' + g * interval '5 minutes', g % 4, g % 50 "
          "FROM generate_series(0, 3 * 288 - 1) g")
    rollup = ("SELECT time_bucket(INTERVAL '1 hour', time) AS bucket, device, count(*) AS n, sum(v) AS total, "
              "max(v) AS top FROM ht_cagg GROUP BY bucket, device")
    env.q(f"CREATE MATERIALIZED VIEW ht_cagg_hourly WITH (timescaledb.continuous) AS {rollup}")
    expected = env.q(f"{rollup} ORDER BY bucket, device")
    assert env.q("SELECT * FROM ht_cagg_hourly ORDER BY bucket, device") == expected
    assert len(expected) == 3 * 24 * 4
    info = env.q("SELECT view_name, hypertable_name, materialized_only FROM timescaledb_information.continuous_aggregates WHERE view_name = 'ht_cagg_hourly'")
    assert info == [("ht_cagg_hourly", "ht_cagg", True)]
    # New data is not visible until a refresh of its window; a refresh touches only whole buckets.
    env.q("INSERT INTO ht_cagg VALUES ('2024-10-02 10:10+00', 1, 1000), ('2024-10-02 11:10+00', 2, 2000)")
    assert env.q("SELECT max(top) FROM ht_cagg_hourly") == [(49.0,)]
    env.admin.execute("CALL refresh_continuous_aggregate('ht_cagg_hourly', '2024-10-02 10:30+00', '2024-10-02 12:00+00')")
    # [10:30, 12:00) holds only the whole bucket 11:00: 10:00 is not refreshed yet.
    assert env.q("SELECT bucket, device, top FROM ht_cagg_hourly WHERE top >= 1000") == [
        (env.q("SELECT timestamptz '2024-10-02 11:00+00'")[0][0], 2, 2000.0)
    ]
    env.admin.execute("CALL refresh_continuous_aggregate('ht_cagg_hourly', '2024-10-02 00:00+00', NULL)")
    assert env.q("SELECT * FROM ht_cagg_hourly ORDER BY bucket, device") == env.q(f"{rollup} ORDER BY bucket, device")
    (job,) = env.q("SELECT add_continuous_aggregate_policy('ht_cagg_hourly', start_offset => NULL, end_offset => NULL, schedule_interval => INTERVAL '1 hour')")[0]
    assert env.q(f"SELECT proc_name FROM timescaledb_information.jobs WHERE job_id = {job}") == [("policy_refresh_continuous_aggregate",)]
    env.q("SELECT remove_continuous_aggregate_policy('ht_cagg_hourly')")
    env.q("DROP MATERIALIZED VIEW ht_cagg_hourly")
    assert env.q("SELECT to_regclass('ht_cagg_hourly')") == [(None,)]
    assert env.q("SELECT count(*) FROM timescaledb_information.continuous_aggregates WHERE view_name = 'ht_cagg_hourly'") == [(0,)]


def test_copy_to_stdout_reads_hot_and_compressed_chunks(env: Env) -> None:
    env.q("CREATE TABLE ht_out (time timestamptz NOT NULL, device int NOT NULL, v int)")
    env.q("SELECT create_hypertable('ht_out', 'time', 'device', 2, chunk_time_interval => INTERVAL '1 day')")
    env.q("INSERT INTO ht_out SELECT timestamptz '2024-11-01' + g * interval '1 hour', g % 3, g FROM generate_series(0, 71) g")
    env.q("ALTER TABLE ht_out SET (timescaledb.compress, timescaledb.compress_segmentby = 'device')")
    for (name,) in env.q("SELECT show_chunks('ht_out', older_than => '2024-11-02 00:00+00')"):
        env.q(f"SELECT compress_chunk('{name}')")
    with env.connect(autocommit=True) as c:
        with c.cursor().copy("COPY ht_out (v, device) TO STDOUT") as cp:
            rows = sorted(tuple(int(x) for x in r) for r in cp.rows())
    assert rows == sorted((g, g % 3) for g in range(72))
    with pytest.raises(psycopg.Error) as err:
        env.q("SELECT undistribute_table('ht_out')")
    assert sqlstate(err.value) == "0A000"


@pytest.mark.parametrize(
    ("column_type", "values", "bound"),
    [
        ("date", ["2024-03-04", "2024-03-06", "2024-03-07"], "FOR VALUES FROM ('2024-02-29') TO ('2024-03-07')"),
        (
            "timestamp",
            ["2024-03-04 00:00:00", "2024-03-06 23:59:59.999999", "2024-03-07 00:00:00"],
            "FOR VALUES FROM ('2024-02-29 00:00:00') TO ('2024-03-07 00:00:00')",
        ),
    ],
)
def test_date_and_timestamp_time_columns(env: Env, column_type: str, values: list[str], bound: str) -> None:
    table = f"ht_{column_type}"
    env.q(f"CREATE TABLE {table} (day {column_type} NOT NULL, v int)")
    env.q(f"SELECT create_hypertable('{table}', by_range('day', INTERVAL '7 days'))")
    with env.connect(autocommit=True) as c:
        for i, value in enumerate(values):
            c.execute(f"INSERT INTO {table} VALUES (%s, %s)", (value, i))
    parts = env.partitions(table)
    # 7-day chunks count from the Unix epoch (a Thursday), as in TimescaleDB.
    assert len(parts) == 2 and bound in [p[1] for p in parts], parts
    assert env.q(f"SELECT v FROM {table} WHERE day >= '2024-03-07' ORDER BY v") == [(2,)]
    assert env.q(f"SELECT count(*) FROM {table} WHERE day < '2024-03-07'") == [(2,)]


def test_migrate_data_moves_existing_rows_into_chunks(env: Env) -> None:
    env.q("CREATE TABLE ht_migrate (time timestamptz NOT NULL, v int)")
    env.q("INSERT INTO ht_migrate SELECT timestamptz '2024-12-01' + g * interval '6 hours', g FROM generate_series(0, 19) g")
    with pytest.raises(psycopg.Error) as err:
        env.q("SELECT create_hypertable('ht_migrate', 'time', chunk_time_interval => INTERVAL '1 day')")
    assert "migrate_data" in str(err.value)
    env.q("SELECT create_hypertable('ht_migrate', 'time', chunk_time_interval => INTERVAL '1 day', migrate_data => true)")
    assert len(chunk_names(env, "ht_migrate")) == 5
    assert env.q("SELECT count(*), sum(v) FROM ht_migrate") == [(20, sum(range(20)))]
    assert env.q("SELECT v FROM ht_migrate WHERE time >= '2024-12-03' AND time < '2024-12-04' ORDER BY v") == [(8,), (9,), (10,), (11,)]
