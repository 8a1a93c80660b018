"""Watching a deployment: operator metrics, the Prometheus collector and the Dask dashboard page."""
