"""The gateway's own operations: counters, Prometheus metrics and the health monitor."""
