"""Running it: metrics, logs, the canary, worker processes."""
