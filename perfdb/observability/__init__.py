"""What operators watch: Prometheus metrics, health and readiness endpoints, structured logs.

Only the entry points (server, dashboard, runtime) import this package; the layers below it
expose plain counters and hooks that it reads, and never import it.
"""
