"""Clients for the perfdb wire protocol: an asyncio client and a small blocking one."""

from perfdb.client.aio import AsyncClient
from perfdb.client.blocking import Client
from perfdb.client.common import PerfdbClientError, RetryPolicy, tls_context

__all__ = ["AsyncClient", "Client", "PerfdbClientError", "RetryPolicy", "tls_context"]
