"""The benchmark workload: realistic gRPC-style records for a few hundred users with static tokens."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import orjson

USERS = 300


def token_for(user: int) -> str:
    return f"bench-token-{user:04d}-{'x' * 24}"


def write_tokens_file(path: Path, users: int = USERS) -> None:
    """Static tokens, so no identity-provider latency is measured."""
    entries = [
        {"sha256": hashlib.sha256(token_for(user).encode()).hexdigest(), "user_id": f"bench-{user:04d}"}
        for user in range(users)
    ]
    path.write_bytes(orjson.dumps({"tokens": entries}))


CLIENT_CONFIG = {"client_type": "ASYNC_CLIENT", "outstanding_rpcs_per_channel": 100, "client_channels": 64}
SERVER_CONFIG = {"server_type": "ASYNC_SERVER", "threads_per_cq": 3}
SYS_INFO = {"cpu": "Intel Xeon 2.20GHz", "cores": 12, "os": "Debian 12"}


def record_request(index: int, user: int, rng: random.Random) -> dict[str, Any]:
    qps = round(rng.uniform(5_000, 250_000), 1)
    p50 = round(rng.uniform(100, 30_000), 2)
    return {
        "op": "record",
        "access_token": token_for(user),
        "request_id": f"bench-{index:09d}",
        "test_name": f"cpp_async_unary_qps_{index % 7}",
        "tag": "bench",
        "sys_info": SYS_INFO,
        "metrics": {
            "qps": qps,
            "qps_per_core": round(qps / 12, 1),
            "perc_lat_50": p50,
            "perc_lat_90": round(p50 * 1.4, 2),
            "perc_lat_95": round(p50 * 1.6, 2),
            "perc_lat_99": round(p50 * 1.9, 2),
            "perc_lat_99_point_9": round(p50 * 2.4, 2),
            "server_system_time": round(rng.uniform(50, 150), 1),
            "server_user_time": round(rng.uniform(200, 600), 1),
            "client_system_time": round(rng.uniform(50, 150), 1),
            "client_user_time": round(rng.uniform(200, 500), 1),
        },
        "client_config": CLIENT_CONFIG,
        "server_config": SERVER_CONFIG,
    }


def record_lines(count: int, *, start: int = 0, users: int = USERS, seed: int = 1) -> list[bytes]:
    """`count` encoded request lines; record i belongs to user i % users."""
    rng = random.Random(seed + start)
    return [orjson.dumps(record_request(i, i % users, rng)) + b"\n" for i in range(start, start + count)]


def single_user_lines(count: int, user: int = 0, *, start: int = 0) -> list[bytes]:
    rng = random.Random(start)
    return [orjson.dumps(record_request(i, user, rng)) + b"\n" for i in range(start, start + count)]


def batch_lines(lines: list[bytes], size: int) -> list[bytes]:
    """The same records as record_batch requests of up to `size` records of one user each."""
    by_token: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        request = orjson.loads(line)
        del request["op"]
        by_token.setdefault(request.pop("access_token"), []).append(request)
    batches = []
    for token, records in by_token.items():
        for first in range(0, len(records), size):
            batch = {"op": "record_batch", "access_token": token, "records": records[first : first + size]}
            batches.append(orjson.dumps(batch) + b"\n")
    return batches
