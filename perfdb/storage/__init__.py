"""LevelDB storage: key layout, the group-commit writer thread (records and deletions), the result
store, schema upgrades, the in-memory overview aggregates and offline repair."""

from perfdb.storage.store import Page, ResultStore, StoreOpenError
from perfdb.storage.writer import BatchAck, ImportAck, RecordAck, RecordDeletionAck, Settleable, UserDeletionAck

__all__ = [
    "BatchAck",
    "ImportAck",
    "Page",
    "RecordAck",
    "RecordDeletionAck",
    "ResultStore",
    "Settleable",
    "StoreOpenError",
    "UserDeletionAck",
]
