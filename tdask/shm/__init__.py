"""Shared memory between the processes of one host: regions, their pool, lending frames and mapping them."""
