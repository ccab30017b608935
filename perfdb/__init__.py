"""perfdb: a database server for gRPC-style performance benchmark results."""

__version__ = "0.1.0"

# Bumped whenever the wire contract in protocol_spec.md changes.
PROTOCOL_VERSION = 3

SERVER_NAME = "perfdb"
