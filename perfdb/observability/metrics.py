"""The server's Prometheus metrics.

Counts the server keeps anyway (requests and errors in ServerStats, the writer's counters and
queue, the token cache, LevelDB's own numbers) are read when /metrics is scraped, never
counted a second time. Only what exists nowhere else is observed as it happens: request
latency per op and the size and write time of each group commit, through the hooks
ServerStats and the writer offer.

Another source of metrics (open alerts, say) adds a Collector to `ServerMetrics.registry`;
what it yields is rendered on a worker thread, so it must be safe to call from one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from perfdb import PROTOCOL_VERSION, __version__
from perfdb.auth.tokens import TokenResolver
from perfdb.commands.stats import OK_OUTCOME, ServerStats
from perfdb.observability.http import process_registry, render
from perfdb.protocol.errors import PerfdbError
from perfdb.storage import ResultStore
from perfdb.storage.alerts import ALERT_STATES
from perfdb.storage.dbstats import DatabaseStats

log = logging.getLogger("perfdb.observability")

# Seconds from a request line to its reply: from a ping (microseconds) to a page of a
# large export or a slow identity provider (seconds).
REQUEST_SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Records taken into one group commit: 1 when idle, up to --max-batch-records (4096 by
# default; an import of 1000 records is never split) under load.
BATCH_RECORDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Seconds LevelDB takes to write one batch: tens of microseconds without fsync, milliseconds with.
COMMIT_SECONDS_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class ServerMetrics:
    """The server's registry: live histograms, plus a snapshot of its counters taken on the
    event loop at each scrape."""

    def __init__(self, stats: ServerStats, store: ResultStore, resolver: TokenResolver, ops: Sequence[str]) -> None:
        self._stats = stats
        self._store = store
        self._resolver = resolver
        self._ops = tuple(ops)
        self.registry = process_registry()
        request_seconds = Histogram(
            "perfdb_request_duration_seconds",
            "Time from a request line to its reply, by op",
            ["op"],
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=self.registry,
        )
        # One child per op of the command table, made now: every op has series from the start,
        # and the hot path does a dict lookup instead of labels()'s locking.
        self._request_seconds = {op: request_seconds.labels(op) for op in self._ops}
        self._commit_records = Histogram(
            "perfdb_commit_batch_records",
            "Records taken into one group commit",
            buckets=BATCH_RECORDS_BUCKETS,
            registry=self.registry,
        )
        self._commit_seconds = Histogram(
            "perfdb_commit_write_seconds",
            "Time LevelDB took to write one group commit, fsync included unless --no-sync",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, op: str, seconds: float) -> None:
        """ServerStats.observe_latency: on the event loop, for ops of the command table only."""
        self._request_seconds[op].observe(seconds)

    def observe_commit(self, records: int, seconds: float) -> None:
        """GroupCommitWriter.commit_observer: on the writer thread (prometheus_client locks)."""
        self._commit_records.observe(records)
        self._commit_seconds.observe(seconds)

    async def exposition(self) -> bytes:
        """The /metrics body. LevelDB is asked on the store's reader threads, the counters are
        copied on the event loop, and the text is rendered on a worker thread."""
        database: DatabaseStats | None
        try:
            database = await self._store.database_stats()
        except PerfdbError as exc:  # closing, or reopening after a failed write
            log.debug("LevelDB metrics left out of this scrape: %s", exc.message)
            database = None
        snapshot = list(self._server_families()) + list(_database_families(database))
        return await render(_Scrape(snapshot, self.registry))

    def _server_families(self) -> Iterator[Metric]:
        stats, writer, resolver = self._stats, self._store.writer, self._resolver
        yield _labelled(
            GaugeMetricFamily(
                "perfdb_build_info", "The running perfdb version", labels=["version", "protocol_version"]
            ),
            [((__version__, str(PROTOCOL_VERSION)), 1)],
        )
        yield _labelled(
            CounterMetricFamily(
                "perfdb_requests",
                "Requests answered, by op and outcome (code: ok or the error code; op: unknown for lines"
                " whose op is not in the command table)",
                labels=["op", "code"],
            ),
            _request_outcomes(stats, self._ops),
        )
        yield GaugeMetricFamily("perfdb_connections_open", "Client connections open now", value=stats.connections_open)
        yield CounterMetricFamily("perfdb_connections", "Client connections accepted", value=stats.connections_total)
        yield CounterMetricFamily(
            "perfdb_connections_refused",
            "Connections refused with 'overloaded' because --max-connections were open",
            value=stats.connections_refused,
        )
        yield GaugeMetricFamily(
            "perfdb_writer_queue_depth", "Submissions waiting for the group-commit writer", value=writer.queue_depth
        )
        yield CounterMetricFamily(
            "perfdb_records_stored",
            "Records stored since the server started (imports included)",
            value=writer.batched_records,
        )
        yield CounterMetricFamily(
            "perfdb_commit_failures",
            "Group commits that failed (every request in them got storage_error)",
            value=writer.failed_batches,
        )
        yield CounterMetricFamily(
            "perfdb_database_reopens",
            "Times the database was reopened to recover from a failed write",
            value=writer.reopens,
        )
        yield GaugeMetricFamily("perfdb_database_records", "Records in the database", value=writer.record_count)
        yield GaugeMetricFamily("perfdb_database_users", "Users with a stored profile", value=writer.user_count)
        yield CounterMetricFamily(
            "perfdb_corrupt_records", "Damaged or missing records that reads skipped", value=self._store.corrupt_records
        )
        series_cache = self._store.series_cache
        yield CounterMetricFamily(
            "perfdb_series_cache_hits", "Series reads that found their index in the cache", value=series_cache.hits
        )
        yield CounterMetricFamily(
            "perfdb_series_cache_misses",
            "Series reads of the user or test index that read it whole (not cached, or cached before a rewrite)",
            value=series_cache.misses,
        )
        yield GaugeMetricFamily(
            "perfdb_series_cache_bytes",
            "Bytes of index columns the series cache holds",
            value=series_cache.cached_bytes,
        )
        alert_counts = self._store.alerts.counts
        yield _labelled(
            GaugeMetricFamily("perfdb_alerts", "Stored regression alerts, by state", labels=["state"]),
            [((state,), alert_counts[state]) for state in ALERT_STATES],
        )
        cache = resolver.cache
        yield CounterMetricFamily("perfdb_token_cache_hits", "Token lookups answered by the cache", value=cache.hits)
        yield CounterMetricFamily(
            "perfdb_token_cache_misses",
            "Token lookups the cache could not answer (static tokens excluded)",
            value=cache.misses,
        )
        yield GaugeMetricFamily("perfdb_token_cache_entries", "Tokens in the cache", value=len(cache))
        yield CounterMetricFamily(
            "perfdb_token_provider_requests", "Requests sent to the userinfo endpoint", value=resolver.upstream_requests
        )
        yield CounterMetricFamily(
            "perfdb_token_provider_errors",
            "Userinfo requests that failed or gave no usable answer (auth_unavailable; rejections excluded)",
            value=resolver.upstream_failures,
        )


def _database_families(database: DatabaseStats | None) -> Iterator[Metric]:
    if database is None:
        return
    yield GaugeMetricFamily(
        "perfdb_leveldb_approximate_size_bytes",
        "LevelDB's estimate of the disk space its tables use",
        value=database.approximate_size_bytes,
    )
    yield GaugeMetricFamily(
        "perfdb_leveldb_memory_usage_bytes",
        "LevelDB's estimate of the memory it uses (memtables, block cache)",
        value=database.memory_usage_bytes,
    )
    families = (
        (GaugeMetricFamily("perfdb_leveldb_files", "Table files, by LevelDB level", labels=["level"]), "files"),
        (
            GaugeMetricFamily("perfdb_leveldb_level_size_bytes", "Bytes of table files, by level", labels=["level"]),
            "size_bytes",
        ),
        (
            CounterMetricFamily(
                "perfdb_leveldb_compaction_seconds",
                "Time compactions into a level took since the database opened (whole seconds)",
                labels=["level"],
            ),
            "compaction_seconds",
        ),
        (
            CounterMetricFamily(
                "perfdb_leveldb_compaction_read_bytes",
                "Bytes compactions into a level read since the database opened (whole MiB)",
                labels=["level"],
            ),
            "compaction_read_bytes",
        ),
        (
            CounterMetricFamily(
                "perfdb_leveldb_compaction_written_bytes",
                "Bytes compactions into a level wrote since the database opened (whole MiB)",
                labels=["level"],
            ),
            "compaction_written_bytes",
        ),
    )
    for family, field in families:
        yield _labelled(family, [((str(level.level),), getattr(level, field)) for level in database.levels])


def _request_outcomes(stats: ServerStats, ops: Sequence[str]) -> list[tuple[tuple[str, ...], float]]:
    """Every op's ok series from the start (so rates work), and each (op, code) pair seen since."""
    pairs = {(op, OK_OUTCOME) for op in ops} | set(stats.outcomes)
    return [(pair, stats.outcomes[pair]) for pair in sorted(pairs)]


def _labelled(
    family: GaugeMetricFamily | CounterMetricFamily, samples: Iterable[tuple[tuple[str, ...], float]]
) -> Metric:
    for labels, value in samples:
        family.add_metric(list(labels), value)
    return family


class _Scrape(Collector):
    """One scrape: the snapshot taken on the event loop, then the registry's live collectors."""

    def __init__(self, snapshot: list[Metric], registry: CollectorRegistry) -> None:
        self._snapshot = snapshot
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        yield from self._snapshot
        yield from self._registry.collect()
