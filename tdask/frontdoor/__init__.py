"""The front door: a deployment served over the KServe v2 (Open Inference Protocol) HTTP and gRPC APIs, so any
client of Triton or KServe (curl, ``tritonclient``, load generators) calls its operators."""

from tdask.frontdoor.server import FrontDoor
from tdask.frontdoor.workers import WorkerFrontDoors

__all__ = ["FrontDoor", "WorkerFrontDoors"]
