"""LevelDB storage: key layout, the group-commit writer thread, and the result store."""

from perfdb.storage.store import Page, ResultStore, StoreOpenError
from perfdb.storage.writer import RecordAck

__all__ = ["Page", "RecordAck", "ResultStore", "StoreOpenError"]
