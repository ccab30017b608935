"""The ops: one command table that validates, authorises and calls the services."""
