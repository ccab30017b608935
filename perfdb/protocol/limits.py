"""Limits of the wire that the server enforces and clients size their requests by."""

MAX_BATCH_RECORDS = 1000  # records one record_batch may carry (protocol section 3.21)
