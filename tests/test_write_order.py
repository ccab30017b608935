"""The writer hands each batch to LevelDB in key order: what the database holds afterwards is what
the operations in the order they were made give, whichever runs they are sorted in."""

from __future__ import annotations

import random
from pathlib import Path

import plyvel
import pytest

from perfdb.storage.writer import _KeyOrderedOps


@pytest.mark.parametrize("run", [3, 64, _KeyOrderedOps.SORTED_RUN])
def test_key_ordered_batch_leaves_what_the_operations_in_their_order_leave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: int
) -> None:
    monkeypatch.setattr(_KeyOrderedOps, "SORTED_RUN", run)
    rng = random.Random(run)
    db = plyvel.DB(str(tmp_path / "db"), create_if_missing=True)
    try:
        db.put(b"k:stored", b"before")
        ops = _KeyOrderedOps()
        expected: dict[bytes, bytes] = {b"k:stored": b"before"}
        # Few keys, many operations: each key is put and deleted again and again, across runs.
        for step in range(500):
            key = b"k:%d" % rng.randrange(20) if step % 7 else b"k:stored"
            if rng.random() < 0.3:
                ops.delete(key)
                expected.pop(key, None)
            else:
                value = b"v%d" % step
                ops.put(key, value)
                expected[key] = value
        ops.write(db, sync=False)
        assert dict(db.iterator()) == expected
    finally:
        db.close()
