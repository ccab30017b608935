"""The perfdb web dashboard: an aiohttp application that reads results from a perfdb server."""
