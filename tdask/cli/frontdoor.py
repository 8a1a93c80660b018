"""``tdask-frontdoor``: one more KServe v2 HTTP/gRPC front door for a running deployment (one per host, say);
``python -m deploy`` starts one of its own. Every front door serves every operator of the cluster. With
``--on-workers`` it places one inside every worker process instead, and exits: they stay with the cluster until
``--on-workers --remove``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from distributed import Client

from tdask import config
from tdask.cli.options import add_scheduler_options, at_least, reach_scheduler
from tdask.deploy.cluster import announced_scheduler_address
from tdask.errors import TdaskError
from tdask.frontdoor import FrontDoor, WorkerFrontDoors
from tdask.session import connect
from tdask.worker.plugin import TdaskWorkerPlugin

port = at_least(int, 0, "a port number >= 0 (0: any free port)")


def add_front_door_options(p: argparse.ArgumentParser, optional: bool = True) -> None:
    g = p.add_argument_group("front door (KServe v2 over HTTP and gRPC: curl, tritonclient)")
    g.add_argument("--http-port", type=port, default=None,
                   help=f"HTTP/REST port (0: any free port; default: the deployment file's, else "
                        f"tdask.frontdoor.http-port, {config.get('frontdoor.http-port')})")
    g.add_argument("--grpc-port", type=port, default=None,
                   help=f"gRPC port (0: any free port; default: the deployment file's, else "
                        f"tdask.frontdoor.grpc-port, {config.get('frontdoor.grpc-port')})")
    g.add_argument("--front-door-host", default=None,
                   help=f"interface the front door listens on (0.0.0.0: every one; default: the deployment file's, "
                        f"else tdask.frontdoor.host, {config.get('frontdoor.host')})")
    if optional:
        g.add_argument("--no-front-door", action="store_true", help="start no front door")


def front_door_settings(args: argparse.Namespace, from_file: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the front door listens: the command line's options, else the deployment file's, else tdask's config."""
    from_file = from_file or {}
    chosen = {}
    for option, key in (("front_door_host", "host"), ("http_port", "http-port"), ("grpc_port", "grpc-port")):
        value = getattr(args, option)
        chosen[key] = value if value is not None else from_file.get(key, config.get(f"frontdoor.{key}"))
    return chosen


async def start_front_door(client: Client, args: argparse.Namespace,
                           from_file: dict[str, Any] | None = None) -> FrontDoor:
    """A front door on ``client``'s cluster, its addresses printed as deploy prints them."""
    where = front_door_settings(args, from_file)
    session = await connect(client)
    door = FrontDoor(session, host=where["host"], http_port=int(where["http-port"]),
                     grpc_port=int(where["grpc-port"]), close_session=True)
    try:
        await door.start()
    except BaseException:
        await session.close()
        raise
    print(f"KServe v2 HTTP: {door.http_url}", flush=True)
    print(f"KServe v2 gRPC: {door.grpc_address}", flush=True)
    return door


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdask-frontdoor", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_scheduler_options(p)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_front_door_options(p, optional=False)
    g = p.add_argument_group("front doors inside the workers")
    g.add_argument("--on-workers", action="store_true",
                   help="place a front door inside every worker process (also workers that join later), print "
                        "where each listens and exit; ports default to 0 there (a free one each)")
    g.add_argument("--remove", action="store_true", help="with --on-workers: take the workers' front doors away")
    return p


async def place_on_workers(client: Client, args: argparse.Namespace) -> int:
    """``--on-workers``: the front doors placed in (or, ``--remove``, taken from) every worker."""
    if args.remove:
        try:
            await client.unregister_worker_plugin(WorkerFrontDoors.name)
        except ValueError:  # Dask's answer for a plugin not registered
            print("Error: the workers have no front doors of tdask-frontdoor --on-workers", file=sys.stderr,
                  flush=True)
            return 1
        print("Removed the workers' front doors", flush=True)
        return 0
    plugin = WorkerFrontDoors(args.front_door_host, args.http_port or 0, args.grpc_port or 0)
    try:
        await client.register_plugin(TdaskWorkerPlugin())
        await client.register_plugin(plugin)
    except Exception as e:  # a worker could not start its front door (a port taken): none stays
        with contextlib.suppress(ValueError):
            await client.unregister_worker_plugin(WorkerFrontDoors.name)
        print(f"Error: front doors on the workers: {e}", file=sys.stderr, flush=True)
        return 1
    for worker, where in sorted((await client.run(WorkerFrontDoors.addresses)).items()):
        if where is not None:
            print(f"Front door in worker {worker}: KServe v2 HTTP: {where['http']}, KServe v2 gRPC: {where['grpc']}",
                  flush=True)
    print("Front doors placed in the workers; tdask-frontdoor --on-workers --remove takes them away", flush=True)
    return 0


async def serve(args: argparse.Namespace) -> int:
    address = args.scheduler_address or announced_scheduler_address()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = await reach_scheduler(address, args.connect_timeout, direct_to_workers=True)
    if client is None:
        return 1
    if args.on_workers:
        try:
            return await place_on_workers(client, args)
        finally:
            await client.close()
    try:
        door = await start_front_door(client, args)
        print(f"Front door serving the deployment at {address} ... press Ctrl-C to Exit", flush=True)
        await stop.wait()
        await door.close()
    except TdaskError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        await client.close()
    print("Stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.remove and not args.on_workers:
        parser.error("--remove takes the front doors of --on-workers away: give both")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
