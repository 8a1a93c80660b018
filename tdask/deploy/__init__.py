"""Placing operators on a cluster: deployments, placement, the embedded cluster, and deploy's worker settings."""
