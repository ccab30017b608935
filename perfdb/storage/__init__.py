"""LevelDB storage: key layout, the group-commit writer thread (records and deletions), the result
store, schema upgrades, the in-memory overview aggregates and offline repair."""

from perfdb.storage.store import Page, ResultStore, StoreOpenError
from perfdb.storage.writer import BatchAck, RecordAck, RecordDeletionAck, UserDeletionAck

__all__ = ["BatchAck", "Page", "RecordAck", "RecordDeletionAck", "ResultStore", "StoreOpenError", "UserDeletionAck"]
