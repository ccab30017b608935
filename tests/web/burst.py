"""A burst as a new user would send one: tens of thousands of results within seconds, many sharing
a microsecond, from several users, tests and tags; loaded through `import` so it takes seconds."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from perfdb.client import Client
from perfdb.records.record_ids import make_record_id
from perfdb.records.timestamps import format_micros, now_micros

BURST_SIZE = 24_000
BURST_USERS = {f"burst-user-{index:02d}": {"name": f"Burst User {index:02d}"} for index in range(12)}
BURST_TESTS = [f"burst_test_{index}" for index in range(8)]
BURST_TAGS = ["nightly", "pr", "release", ""]
SHARED_MICROSECOND = 6  # results stored in each microsecond of the burst


@dataclasses.dataclass(frozen=True)
class BurstData:
    records: list[dict[str, Any]]  # oldest first

    def newest_first(self, **equal: str) -> list[dict[str, Any]]:
        """The records whose fields equal these values, newest first."""
        chosen = [record for record in self.records if all(record[name] == value for name, value in equal.items())]
        return chosen[::-1]

    def by_qps(self, **equal: str) -> list[dict[str, Any]]:
        """Highest QPS first; ties oldest first, as perfdb ranks them."""
        return sorted(self.newest_first(**equal), key=lambda record: (-record["metrics"]["qps"], record["record_id"]))


def build_burst(size: int = BURST_SIZE, seed: int = 11) -> BurstData:
    """`size` results over about two seconds ending ten seconds ago, SHARED_MICROSECOND per
    microsecond. The highest QPS of all is the oldest result, so only a ranking of the whole set
    finds it: a ranking of the newest part would miss it."""
    rng = random.Random(seed)
    start = now_micros() - 12_000_000
    users = list(BURST_USERS)
    records = []
    for index in range(size):
        micros = start + (index // SHARED_MICROSECOND) * 500
        user = users[rng.randrange(len(users))]
        test = BURST_TESTS[rng.randrange(len(BURST_TESTS))]
        qps = round(rng.uniform(1_000, 100_000), 1)
        if index == 0:
            qps = 250_000.0
        records.append(
            {
                "record_id": make_record_id(micros, index % SHARED_MICROSECOND),
                "user_id": user,
                "timestamp": format_micros(micros),
                "test_name": test,
                "tag": BURST_TAGS[rng.randrange(len(BURST_TAGS))],
                "metrics": {
                    "qps": qps,
                    "perc_lat_50": round(rng.uniform(50, 500), 2),
                    "perc_lat_99": round(rng.uniform(500, 5000), 2),
                },
            }
        )
    return BurstData(records)


def load_burst(client: Client, admin_key: str, data: BurstData) -> None:
    """Import the burst, 1000 results a request (the most one import takes)."""
    for start in range(0, len(data.records), 1000):
        batch = data.records[start : start + 1000]
        users = {record["user_id"]: BURST_USERS[record["user_id"]] for record in batch}
        reply = client.call("import", admin_key=admin_key, records=batch, users=users)
        assert reply["imported"] == len(batch), reply
