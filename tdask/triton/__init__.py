"""Triton Inference Server: the server process, its clients, model configs, and ``TritonCoreOperator``."""
