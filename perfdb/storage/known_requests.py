"""Which idempotency keys (i:<user_id>\\0<request_id>) may be stored: a Bloom filter in memory, so
that the writer reads the database only for a request_id it may have seen, not for every record.

A Bloom filter never forgets a key it was given (no false negatives) and wrongly claims a few it
was not (false positives, about 0.2% here); on a claim the writer reads the key, so a false
positive costs one db.get and never a wrong answer. Keys removed from the database (a deleted
record's, a deleted user's) stay in the filter: they are false positives too.

The writer asks about all of a batch's request ids in one call (numpy does the probing), and
adds the batch's new keys in one call when it commits. The filter is filled at open from a
snapshot of the database, on a thread of its own, while the writer already runs. Until it is
complete, every key is a "maybe" (the writer reads each one, as before), and the keys the writer
stores meanwhile wait in a list; the writer adopts the complete filter, with those keys added, at
its next call. Only the writer thread changes a filter it has adopted, so no bit is ever set by
two threads at once.

It grows as a scalable Bloom filter: when a layer holds as many keys as it was sized for, a new
layer twice its size takes the next ones, and a key may be in any layer. 2 bytes a key: 1,000,000
request ids take about 2-4 MiB.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Iterator

import numpy as np
import numpy.typing as npt

log = logging.getLogger("perfdb.storage")

BITS_PER_KEY = 16
PROBES = 4  # bits set per key: with 16 bits a key, (1 - e^(-4/16))^4, about 0.24% false positives
MIN_CAPACITY = 1 << 16
_PROBE_STEPS = np.arange(PROBES, dtype=np.uint64)
_LOW_32, _SHIFT_32, _ODD = np.uint64(0xFFFF_FFFF), np.uint64(32), np.uint64(1)
_SHIFT_3, _LOW_3 = np.uint64(3), np.uint64(7)

Digests = npt.NDArray[np.uint64]


class _Layer:
    """One Bloom filter of a fixed size: a power of two of bits, in a numpy array of bytes."""

    __slots__ = ("bits", "capacity", "keys", "mask")

    def __init__(self, capacity: int) -> None:
        size = 1 << max(capacity * BITS_PER_KEY - 1, 7).bit_length()  # bits, a power of two
        self.bits = np.zeros(size >> 3, dtype=np.uint8)
        self.mask = np.uint64(size - 1)
        self.capacity = capacity
        self.keys = 0

    def _probes(self, digests: Digests) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint8]]:
        """(byte, bit mask) of each key's probes, a row of PROBES per key. Double hashing (Kirsch
        and Mitzenmacher): probe i is low + i * step, step odd, so that a key's probes differ."""
        low, step = digests & _LOW_32, (digests >> _SHIFT_32) | _ODD
        positions = (low[:, None] + _PROBE_STEPS * step[:, None]) & self.mask
        return positions >> _SHIFT_3, np.left_shift(1, positions & _LOW_3).astype(np.uint8)

    def add(self, digests: Digests) -> None:
        places, masks = self._probes(digests)
        np.bitwise_or.at(self.bits, places, masks)
        self.keys += int(digests.size)

    def contains(self, digests: Digests) -> npt.NDArray[np.bool_]:
        places, masks = self._probes(digests)
        return np.asarray((self.bits[places] & masks).all(axis=1), dtype=np.bool_)


class BloomFilter:
    """A scalable Bloom filter of byte strings (see the module docstring); each call takes many
    keys, so that the Python cost is paid per call rather than per key."""

    __slots__ = ("_layers",)

    def __init__(self, expected_keys: int) -> None:
        self._layers = [_Layer(max(expected_keys, MIN_CAPACITY))]

    def add(self, keys: Collection[bytes]) -> None:
        if not keys:
            return
        layer = self._layers[-1]
        if layer.keys + len(keys) > layer.capacity:
            layer = _Layer(max(layer.capacity * 2, len(keys)))
            self._layers.append(layer)
        layer.add(_digests(keys))

    def contains(self, keys: Collection[bytes]) -> npt.NDArray[np.bool_]:
        """Whether each key may have been added (False: it certainly was not)."""
        digests = _digests(keys)
        found = self._layers[0].contains(digests)
        for layer in self._layers[1:]:
            found |= layer.contains(digests)
        return found

    def __contains__(self, key: bytes) -> bool:
        return bool(self.contains([key])[0])

    @property
    def keys(self) -> int:
        return sum(layer.keys for layer in self._layers)

    @property
    def size_bytes(self) -> int:
        return sum(layer.bits.nbytes for layer in self._layers)


def _digests(keys: Iterable[bytes]) -> Digests:
    # Python's own hash of bytes: SipHash, keyed anew in each process, which is all a filter
    # rebuilt at every start needs (64 bits on the platforms perfdb runs on).
    return np.fromiter(map(hash, keys), dtype=np.int64).view(np.uint64)


class KnownRequests:
    """The writer's view of which idempotency keys may be stored. Everything but the filling is
    for the writer thread only."""

    # Keys per call while filling, and between two looks at whether the filling should stop.
    FILL_CHUNK = 4096
    # Below this many keys a batch reads them all: a read of a key LevelDB does not hold costs
    # about 2 us of CPU, a call of the filter some 50 us whatever it is given.
    MIN_KEYS = 32

    def __init__(self, expected_keys: int) -> None:
        self._expected_keys = expected_keys
        self._filter: BloomFilter | None = None  # None until adopted: every key may exist
        self._waiting: list[bytes] | None = []  # keys stored before adoption; None once it cannot come
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Set by the filling thread only, then read by the writer:
        self._filled: BloomFilter | None = None
        self._failed = False

    @property
    def ready(self) -> bool:
        """Whether the writer has adopted the filter (before, every key is a maybe)."""
        return self._filter is not None

    def absent(self, keys: Collection[bytes]) -> set[bytes]:
        """Those of `keys` that are certainly not stored (none while the filter is not ready, or
        for fewer than MIN_KEYS keys, which are cheaper to read)."""
        known = self._filter or self._adopt()
        if known is None or len(keys) < self.MIN_KEYS:
            return set()
        return {key for key, found in zip(keys, known.contains(keys).tolist(), strict=True) if not found}

    def may_exist(self, key: bytes) -> bool:
        """False only if the key is certainly not stored."""
        known = self._filter or self._adopt()
        return known is None or key in known

    def add(self, keys: Collection[bytes]) -> None:
        """Keys the writer stores (or is about to: one in a batch that fails is a false positive)."""
        known = self._filter or self._adopt()
        if known is not None:
            known.add(keys)
        elif self._waiting is not None:
            self._waiting.extend(keys)

    def _adopt(self) -> BloomFilter | None:
        """The filled filter with the waiting keys added, once the filling thread is done."""
        if self._waiting is None:
            return None
        if self._failed:
            self._waiting = None  # it will never be adopted: stop keeping keys for it
            return None
        filled = self._filled
        if filled is None:
            return None
        filled.add(self._waiting)
        self._waiting = None
        self._filter = filled
        return filled

    def start_filling(self, stored_keys: Iterator[bytes]) -> None:
        """Fill the filter on a daemon thread from `stored_keys`, every key stored before the
        writer stored any (an iterator over a snapshot: every later key reaches `add`)."""
        self._thread = threading.Thread(target=self._fill, args=(stored_keys,), name="perfdb-requests", daemon=True)
        self._thread.start()

    def stop_filling(self) -> None:
        """End the filling early, if it still runs, and wait for its thread: before the database
        handle it reads is closed. The writer then reads every key, as before."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def wait_filled(self, timeout: float) -> bool:
        """Wait until the filling thread is done (for tests and measurements)."""
        if self._thread is None:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _fill(self, stored_keys: Iterator[bytes]) -> None:
        try:
            filled = BloomFilter(self._expected_keys)
            chunk: list[bytes] = []
            for key in stored_keys:
                chunk.append(key)
                if len(chunk) == self.FILL_CHUNK:
                    filled.add(chunk)
                    chunk = []
                    if self._stopping.is_set():
                        self._failed = True
                        return
            filled.add(chunk)
            if self._stopping.is_set():
                self._failed = True
                return
            self._filled = filled
            log.debug("idempotency filter filled: %d keys in %d bytes", filled.keys, filled.size_bytes)
        except Exception as exc:  # the writer goes on reading every key, as it did before
            log.warning("idempotency filter not filled (%s): every request_id is looked up in the database", exc)
            self._failed = True
        finally:
            close = getattr(stored_keys, "close", None)
            if close is not None:
                close()
