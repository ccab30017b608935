"""The key layout's index entries: the path for records with every core metric gives exactly the
entries the encoding of one metric at a time gives, whatever the metrics hold."""

from __future__ import annotations

import random

import orjson
import pytest

from perfdb.storage import layout

RECORD_ID = "0000018c2f3e4a000001"
METRICS = layout.INDEXED_METRICS


def entries_one_metric_at_a_time(metrics: object) -> list[tuple[bytes, bytes]]:
    """What record_index_entries must give, from the documented encoding (sortable_number)."""
    rid = RECORD_ID.encode()
    fields = b'["alice","unary","nightly"]'
    # The user and test entries carry the core metrics' numbers by position (null where not a
    # number) and the other numeric metrics by name.
    core = [layout.metric_number(metrics, metric) for metric in METRICS]
    values = metrics if isinstance(metrics, dict) else {}
    others = {name: value for name, value in values.items() if name not in METRICS and type(value) in (int, float)}
    entries = [
        (layout.user_index_prefix("alice") + rid, orjson.dumps(["unary", "nightly", core, others])),
        (layout.test_index_prefix("unary") + rid, orjson.dumps(["alice", "nightly", core, others])),
        (layout.tag_index_prefix("nightly") + rid, b'["alice","unary"]'),
    ]
    for metric in METRICS:
        number = layout.metric_number(metrics, metric)
        if number is None:
            entries.append((layout.metric_lacking_prefix(metric) + rid, fields))
        else:
            entries.append((layout.metric_index_prefix(metric) + layout.sortable_number(number) + rid, fields))
    return entries


rng = random.Random(3)
CASES = {
    "every metric, floats": {metric: rng.uniform(0, 1e6) for metric in METRICS},
    "every metric, integers": {metric: rng.randrange(10**12) for metric in METRICS},
    "zeros, and more metrics": {**{metric: 0 for metric in METRICS}, "custom": 1.5},
    "one negative": {**{metric: 1.0 for metric in METRICS}, METRICS[4]: -2.5},
    "negative zero": {**{metric: 1.0 for metric in METRICS}, METRICS[0]: -0.0},
    "largest integer": {**{metric: 1.0 for metric in METRICS}, METRICS[1]: 2**63 - 1},
    "some lacking": {metric: 7.0 for metric in METRICS[:5]},
    "a bool": {**{metric: 1.0 for metric in METRICS}, METRICS[2]: True},
    "a string": {**{metric: 1.0 for metric in METRICS}, METRICS[2]: "fast"},
    "not an object": ["qps", 1.0],
}


@pytest.mark.parametrize("metrics", CASES.values(), ids=CASES.keys())
def test_index_entries_match_the_one_metric_at_a_time_encoding(metrics: object) -> None:
    got = layout.record_index_entries(RECORD_ID, "alice", "unary", "nightly", metrics)
    assert got == entries_one_metric_at_a_time(metrics)


def test_sortable_numbers_of_the_whole_record_path_sort_as_the_numbers() -> None:
    values = sorted(rng.uniform(0, 1e9) for _ in range(200))
    keys = [
        layout.record_index_entries(RECORD_ID, "alice", "unary", "nightly", dict.fromkeys(METRICS, value))[3][0]
        for value in values
    ]
    assert keys == sorted(keys)
