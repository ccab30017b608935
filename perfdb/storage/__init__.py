"""LevelDB storage: key layout, the group-commit writer thread, and the result store."""

from perfdb.storage.store import Page, RecordAck, ResultStore, StoreOpenError

__all__ = ["Page", "RecordAck", "ResultStore", "StoreOpenError"]
