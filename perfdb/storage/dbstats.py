"""LevelDB's own numbers about a database (size, memory, files and compactions per level), for monitoring."""

from __future__ import annotations

import dataclasses
import re

import plyvel

# LevelDB keeps its tables in levels 0 to 6 (config::kNumLevels).
LEVELS = 7
# Every perfdb key starts with an ASCII prefix (layout.py), so this range holds all of them.
_ALL_KEYS = (b"", b"\xff")
_MIB = 1024 * 1024

# "--- level 2 ---", then one line per table: " 5:49707['first' @ 1 : 1 .. 'last' @ 436 : 1]"
_SSTABLE_LEVEL = re.compile(rb"^--- level (\d+) ---$")
_SSTABLE_FILE = re.compile(rb"^\s*\d+:(\d+)\[")
# A row of leveldb.stats: level, files, size (MB), compaction time (s), read (MB), written (MB).
_COMPACTION_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


@dataclasses.dataclass(frozen=True, slots=True)
class LevelStats:
    """One level: its tables now, and the compactions that wrote into it since the database opened."""

    level: int
    files: int = 0
    size_bytes: int = 0
    compaction_seconds: float = 0.0  # LevelDB reports whole seconds and whole MiB
    compaction_read_bytes: int = 0
    compaction_written_bytes: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseStats:
    approximate_size_bytes: int  # the tables holding perfdb's keys, on disk
    memory_usage_bytes: int  # LevelDB's estimate of its memtables and block cache
    levels: tuple[LevelStats, ...]  # one per level, 0 to LEVELS - 1


def read_database_stats(db: plyvel.DB) -> DatabaseStats:
    """Ask LevelDB for its numbers. Blocking (it may touch the disk): call it off the event loop."""
    approximate_size = db.approximate_size(*_ALL_KEYS)
    memory = db.get_property(b"leveldb.approximate-memory-usage")
    tables = parse_sstables(db.get_property(b"leveldb.sstables") or b"")
    compactions = parse_compaction_stats((db.get_property(b"leveldb.stats") or b"").decode(errors="replace"))
    levels = []
    for level in range(LEVELS):
        files, size = tables.get(level, (0, 0))
        seconds, read, written = compactions.get(level, (0.0, 0, 0))
        levels.append(LevelStats(level, files, size, seconds, read, written))
    return DatabaseStats(int(approximate_size), int(memory or 0), tuple(levels))


def parse_sstables(text: bytes) -> dict[int, tuple[int, int]]:
    """Files and bytes per level from LevelDB's `leveldb.sstables` property."""
    levels: dict[int, tuple[int, int]] = {}
    level: int | None = None
    for line in text.splitlines():
        heading = _SSTABLE_LEVEL.match(line)
        if heading is not None:
            level = int(heading.group(1))
            levels.setdefault(level, (0, 0))
            continue
        table = _SSTABLE_FILE.match(line)
        if table is not None and level is not None:
            files, size = levels[level]
            levels[level] = (files + 1, size + int(table.group(1)))
    return levels


def parse_compaction_stats(text: str) -> dict[int, tuple[float, int, int]]:
    """Compaction seconds, bytes read and bytes written per level from LevelDB's `leveldb.stats`
    property (it lists only levels that hold tables or were compacted into)."""
    levels: dict[int, tuple[float, int, int]] = {}
    for line in text.splitlines():
        row = _COMPACTION_ROW.match(line)
        if row is not None:
            level, _files, _size, seconds, read, written = (int(value) for value in row.groups())
            levels[level] = (float(seconds), read * _MIB, written * _MIB)
    return levels
