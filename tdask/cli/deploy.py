"""``python -m deploy``: place operators (the hello world's, a model repository's, a deployment file's) on a Dask
cluster and serve until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client
from distributed.protocol import pickle

from tdask.cli.frontdoor import add_front_door_options, start_front_door
from tdask.cli.options import at_least, check_protocol, positive_float, reach_scheduler
from tdask.cli.options import device as _device
from tdask.cli.options import non_negative_float as _non_negative_float
from tdask.cli.options import positive_int as _positive
from tdask.compat import TimeoutErrors
from tdask.deploy import spec
from tdask.deploy.cluster import (
    count_gpus,
    remove_address_file,
    start_embedded_cluster,
    write_address_file,
)
from tdask.deploy.deployment import Deployment
from tdask.deploy.supervisor import DEPLOY_HANDLER, LIST_HANDLER, REMOVE_HANDLER, DeploymentsPlugin
from tdask.deploy.worker_settings import WorkerSettings
from tdask.errors import TdaskError, from_wire
from tdask.operator import OperatorConfig

logger = logging.getLogger("deploy")



def hello_world_repository() -> Path:
    """The hello world's operators, shipped in the package as ``tdask.hello_world`` (the repository's
    ``operators/`` folder): found from any folder, installed or not."""
    spec = importlib.util.find_spec("tdask.hello_world")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tdask is installed without its hello-world operators (tdask.hello_world): reinstall it")
    return Path(next(iter(spec.submodule_search_locations)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy",
        description="Deploy operators on a Dask cluster: the hello-world encoder/decoder pipeline by default, or "
        "a Triton model repository's models (--model-repository), or a deployment file's operators (--config).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("operators (as in the original example)")
    g.add_argument("--encoders", nargs=4, metavar=("WORKERS", "MAX_INFLIGHT", "INSTANCES", "CPU|GPU"),
                   default=None, help="encoder replicas, max in-flight per replica, model instances, device "
                   "(default 1 1 1 CPU)")
    g.add_argument("--decoders", nargs=4, metavar=("WORKERS", "MAX_INFLIGHT", "INSTANCES", "CPU|GPU"),
                   default=None, help="decoder replicas, max in-flight, model instances, device (default 1 1 1 CPU)")
    g.add_argument("--encoder-decoders", nargs=2, metavar=("WORKERS", "MAX_INFLIGHT"), default=None,
                   help="encoder_decoder replicas and max in-flight (default 1 1)")
    for op in ("encoder", "decoder", "encoder-decoder"):
        n = p.add_argument_group(f"{op} (named options; override the positional form)")
        n.add_argument(f"--{op}-replicas", type=_positive, default=None, help=f"{op} replicas")
        n.add_argument(f"--{op}-max-inflight", type=_positive, default=None, help=f"{op} max in-flight per replica")
        if op != "encoder-decoder":
            n.add_argument(f"--{op}-instances", type=_positive, default=None, help=f"{op} model instances")
            n.add_argument(f"--{op}-device", type=_device, default=None, help=f"{op} device, CPU or GPU")
    g.add_argument("--encoder-delay-per-token", type=_non_negative_float, default=0.0,
                   help="encoder sleep per input element, seconds")
    g.add_argument("--decoder-delay-per-token", type=_non_negative_float, default=0.0,
                   help="decoder sleep per input element, seconds")
    g.add_argument("--encoder-input-copies", type=_positive, default=1, help="encoder's input_copies")
    g.add_argument("--streaming", action="store_true",
                   help="also deploy the streaming pair: decoder_stream (a decoupled Triton model answering the "
                        "decoded output in chunks of the request parameter chunk_size, default 1000) and "
                        "encoder_decoder_stream (encoder, then decoder_stream, each chunk a response); decoder_stream "
                        "takes the decoder's settings, encoder_decoder_stream encoder_decoder's")
    o = p.add_argument_group("any operators (instead of the hello world)")
    o.add_argument("--model-repository", default=None, metavar="DIR",
                   help="serve every model of this Triton model repository (each <name>/config.pbtxt) as an operator "
                   "named after its folder")
    o.add_argument("--config", default=None, metavar="FILE",
                   help="deploy the operators a YAML deployment file lists (fields of tdask.OperatorConfig; "
                   "see operators/hello_world.yaml); with --model-repository, the file's entries win")
    o.add_argument("--set", action="append", default=[], metavar="NAME.FIELD=VALUE", dest="settings",
                   help="set one operator's field (replicas, max_inflight, instances, device, version, resources.R, "
                   "parameters.P, ...), e.g. --set add_sub.instances=2; repeatable")
    r = p.add_argument_group("repositories")
    r.add_argument("--operator-repository", default=None,
                   help="folder of Python operators (module:Class) (default: the hello world's, shipped with tdask)")
    r.add_argument("--triton-model-repository", default=None,
                   help="Triton model repository (default: <operator-repository>/triton_core_models)")
    r.add_argument("--triton-server-path", default=None,
                   help="your Triton installation's tritonserver, used as it is (default: tdask's own Triton, in "
                   "the environment it makes once: see tdask-triton-env)")
    c = p.add_argument_group("cluster")
    c.add_argument("--scheduler-address", default=None,
                   help="a running scheduler (dask scheduler); without it an embedded cluster is started")
    c.add_argument("--protocol", default="tcp", choices=("tcp", "ucx", "tls"),
                   help="comm protocol of the embedded cluster")
    c.add_argument("--scheduler-port", type=at_least(int, 0, "a port number >= 0"), default=8786,
                   help="embedded scheduler port (0: any free port)")
    c.add_argument("--dashboard-address", default=":8787", help="embedded dashboard address")
    c.add_argument("--n-workers", type=_positive, default=None,
                   help="embedded CPU workers (default: one per CPU replica)")
    c.add_argument("--gpus", type=at_least(int, 0, "a number of GPUs >= 0"), default=None,
                   help="embedded GPU workers (default: GPUs found)")
    c.add_argument("--connect-timeout", type=positive_float, default=5.0,
                   help="seconds to reach a running scheduler (--scheduler-address) before giving up")
    add_front_door_options(p)
    d = p.add_argument_group("deployments that outlive this command (on a running scheduler)")
    d.add_argument("--detach", action="store_true",
                   help="place the operators, leave them served and supervised by the scheduler, and exit")
    d.add_argument("--list", action="store_true", help="list the detached deployments and their replicas, and exit")
    d.add_argument("--remove", action="store_true",
                   help="remove the detached deployment --name (every one with --name omitted) and exit")
    d.add_argument("--name", default=None,
                   help="the detached deployment's name (default: 'default'; deploying a name again replaces it)")
    lg = p.add_argument_group("logging")
    lg.add_argument("--log-dir", default=None, help="one log file per worker plus each Triton server's log")
    lg.add_argument("--clear-logs", action="store_true", help="empty --log-dir first")
    lg.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                    help="log level of tdask and the workers")
    return p


def operator_configs(args: argparse.Namespace) -> list[OperatorConfig]:
    """What deploy places: a repository's models and a file's operators, or else the hello world; then --set."""
    if args.model_repository is None and args.config is None:
        operators = hello_world_configs(args)
    else:
        operators = spec.repository_operators(os.path.abspath(args.model_repository)) if args.model_repository else []
        if args.config:
            listed = spec.load(args.config)
            names = {op.name for op in listed}
            operators = [op for op in operators if op.name not in names] + listed
    return spec.with_settings(operators, args.settings)


def hello_world_configs(args: argparse.Namespace) -> list[OperatorConfig]:
    """Turn the CLI's settings into the three operators of the hello-world pipeline."""
    operator_repo = os.path.abspath(args.operator_repository or hello_world_repository())
    model_repo = os.path.abspath(args.triton_model_repository or os.path.join(operator_repo, "triton_core_models"))

    def triton_op(prefix: str, positional: Sequence[str] | None, parameters: dict[str, Any]) -> OperatorConfig:
        replicas, max_inflight, instances, device = (1, 1, 1, "CPU")
        if positional is not None:
            try:
                replicas, max_inflight, instances = (_positive(v) for v in positional[:3])
                device = _device(positional[3])
            except argparse.ArgumentTypeError as e:
                raise SystemExit(f"--{prefix}s: {e}") from None
        name = prefix.replace("-", "_")
        return OperatorConfig(
            name=name,
            implementation="TritonCoreOperator",
            repository=model_repo,
            replicas=getattr(args, f"{name}_replicas") or replicas,
            max_inflight=getattr(args, f"{name}_max_inflight") or max_inflight,
            instances=getattr(args, f"{name}_instances") or instances,
            device=getattr(args, f"{name}_device") or device,
            parameters=parameters,
        )

    encoder = triton_op("encoder", args.encoders,
                        {"delay": args.encoder_delay_per_token, "input_copies": args.encoder_input_copies})
    # the decoder gets input_copies too, as the original deploy gave it to both models (a decoder that reads it from
    # its config, as the original one does, then agrees with the encoder; tdask's takes it from each request)
    decoder = triton_op("decoder", args.decoders,
                        {"delay": args.decoder_delay_per_token, "input_copies": args.encoder_input_copies})
    replicas, max_inflight = 1, 1
    if args.encoder_decoders is not None:
        try:
            replicas, max_inflight = (_positive(v) for v in args.encoder_decoders)
        except argparse.ArgumentTypeError as e:
            raise SystemExit(f"--encoder-decoders: {e}") from None
    encoder_decoder = OperatorConfig(
        name="encoder_decoder",
        implementation="encoder_decoder:EncoderDecoder",
        repository=operator_repo,
        replicas=args.encoder_decoder_replicas or replicas,
        max_inflight=args.encoder_decoder_max_inflight or max_inflight,
    )
    if not args.streaming:
        return [encoder, decoder, encoder_decoder]
    decoder_stream = dataclasses.replace(decoder, name="decoder_stream",
                                         parameters={"delay": args.decoder_delay_per_token})
    encoder_decoder_stream = dataclasses.replace(encoder_decoder, name="encoder_decoder_stream",
                                                 implementation="encoder_decoder:EncoderDecoderStream")
    return [encoder, decoder, encoder_decoder, decoder_stream, encoder_decoder_stream]


def worker_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args.log_dir:
        settings["tdask.log-dir"] = os.path.abspath(args.log_dir)
    if args.triton_server_path:
        settings["tdask.triton.server-path"] = os.path.abspath(args.triton_server_path)
    return settings


def print_replica(info: dict[str, Any]) -> None:
    line = (f"Started {info['name']} replica {info['replica']} on worker {info['worker']}: "
            f"device {info['device']}, model instances {info['instances']}, max in-flight {info['max_inflight']}")
    if info.get("triton_pid"):
        line += f", Triton pid {info['triton_pid']} (metrics {info.get('triton_metrics')})"
    print(line, flush=True)


async def detached(args: argparse.Namespace) -> int:
    """``--detach``, ``--list`` and ``--remove``: ask the scheduler's :class:`DeploymentsPlugin`, then exit."""
    address = args.scheduler_address
    client = await reach_scheduler(address, args.connect_timeout)
    if client is None:
        return 1
    try:
        await client.register_plugin(DeploymentsPlugin())  # once per scheduler: registering again changes nothing
        handlers = client.scheduler
        deployments = getattr(handlers, LIST_HANDLER)
        if args.list:
            listing = await deployments()
            if not listing:
                print("No detached deployments", flush=True)
            for name, replicas in sorted(listing.items()):
                print(f"Deployment {name}: {len(replicas)} replicas", flush=True)
                for info in replicas:
                    print_replica(info)
            return 0
        if args.remove:
            removed = (await getattr(handlers, REMOVE_HANDLER)(name=args.name))["removed"]
            if args.name is not None and not removed:
                print(f"Error: no detached deployment named {args.name!r}", file=sys.stderr, flush=True)
                return 1
            if not await deployments():  # the last one gone: deploy's worker settings go too
                try:
                    await client.unregister_worker_plugin(WorkerSettings.name)
                except Exception as e:  # noqa: BLE001 - never registered (nothing was detached here)
                    logger.debug("removing the worker settings plugin: %r", e)
            print(f"Removed {', '.join(removed) or 'nothing'}", flush=True)
            return 0
        settings = worker_settings(args)
        await client.register_plugin(WorkerSettings(settings, args.log_level))
        name = args.name or "default"
        print(f"Scheduler {address}, dashboard {client.dashboard_link}", flush=True)
        answer = await getattr(handlers, DEPLOY_HANDLER)(name=name, operators=pickle.dumps(operator_configs(args)))
        if "error" in answer:
            print(f"Error: {from_wire(answer['error'])}", file=sys.stderr, flush=True)
            return 1
        for info in answer["replicas"]:
            print_replica(info)
        print(f"Workers started ... detached as {name!r}: the scheduler serves and supervises it; "
              f"python -m deploy --remove --scheduler-address {address} takes it down", flush=True)
        return 0
    finally:
        await client.close()


async def serve(args: argparse.Namespace) -> int:
    if args.detach or args.list or args.remove:
        return await detached(args)
    configs = operator_configs(args)
    door_from_file = spec.front_door(args.config) if args.config else None
    settings = worker_settings(args)
    dask.config.set(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    cluster = None
    if args.scheduler_address is None:
        cpu_replicas = sum(c.replicas for c in configs if c.device == "CPU")
        gpus = args.gpus if args.gpus is not None else (
            count_gpus() if any(c.device == "GPU" for c in configs) else 0)
        cluster = await start_embedded_cluster(
            n_workers=args.n_workers if args.n_workers is not None else max(1, cpu_replicas),
            gpus=gpus, protocol=args.protocol, scheduler_port=args.scheduler_port,
            dashboard_address=args.dashboard_address,
        )
        address = cluster.scheduler_address
        print(f"Embedded cluster: scheduler {address}, dashboard {cluster.dashboard_link}", flush=True)
        write_address_file(address, cluster.dashboard_link)
    else:
        address = args.scheduler_address
    exit_code = 0
    try:
        client = await reach_scheduler(address, args.connect_timeout, direct_to_workers=True)
        if client is None:
            return 1
        lost = asyncio.ensure_future(scheduler_lost(client, args.connect_timeout))
        try:
            if cluster is None:
                print(f"Scheduler {address}, dashboard {client.dashboard_link}", flush=True)
            await client.register_plugin(WorkerSettings(settings, args.log_level))
            deployment = Deployment(client, configs)
            door = None
            try:
                start = asyncio.ensure_future(deployment.start())
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait([start, stopped, lost], return_when=asyncio.FIRST_COMPLETED)
                if not start.done():
                    start.cancel()
                    if not lost.done():
                        print("Interrupted while starting; stopping", flush=True)
                else:
                    for info in start.result():
                        print_replica(info)
                    if not args.no_front_door:
                        door = await start_front_door(client, args, door_from_file)
                        if cluster is not None:  # the client's --protocol http|grpc finds it
                            write_address_file(address, cluster.dashboard_link, http=door.http_url,
                                               grpc=door.grpc_address)
                    print("Workers started ... press Ctrl-C to Exit", flush=True)
                    await asyncio.wait([stopped, lost], return_when=asyncio.FIRST_COMPLETED)
                if lost.done():
                    print(f"Error: the scheduler at {address} is gone, and the operators with it; deploy exits",
                          file=sys.stderr, flush=True)
                    exit_code = 3
                else:
                    print("Stopping operators ...", flush=True)
            except TdaskError as e:
                print(f"Error: {e}", file=sys.stderr, flush=True)
                exit_code = 1
            finally:
                if door is not None:
                    await door.close()
                if not lost.done():
                    await deployment.stop()
                    if cluster is None:  # user's workers keep running, without our plugin
                        try:
                            await client.unregister_worker_plugin(WorkerSettings.name)
                        except Exception as e:
                            logger.warning("removing the worker plugin: %r", e)
        finally:
            lost.cancel()
            try:
                await asyncio.wait_for(client.close(), args.connect_timeout)
            except (OSError, *TimeoutErrors):
                pass
    finally:
        if cluster is not None:
            await cluster.close()
            remove_address_file()
    print("Stopped", flush=True)
    return exit_code


async def scheduler_lost(client: Client, grace: float) -> None:
    """Returns once ``client`` has lost its scheduler: closed, or reconnecting for longer than ``grace`` s."""
    since = None
    while True:
        await asyncio.sleep(0.2)
        status = str(getattr(client.status, "value", client.status))
        if status in ("closing", "closed"):
            return
        if status == "connecting":
            since = since if since is not None else asyncio.get_running_loop().time()
            if asyncio.get_running_loop().time() - since > grace:
                return
        else:
            since = None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum((args.detach, args.list, args.remove)) > 1:
        parser.error("--detach, --list and --remove go one at a time")
    if (args.detach or args.list or args.remove) and args.scheduler_address is None:
        parser.error("--detach, --list and --remove need --scheduler-address: a cluster that outlives this command "
                     "(an embedded one stops with it)")
    problem = check_protocol(args.protocol) if args.scheduler_address is None else None
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.log_dir:
        if args.clear_logs and os.path.isdir(args.log_dir):
            shutil.rmtree(args.log_dir)
        os.makedirs(args.log_dir, exist_ok=True)
    try:
        return asyncio.run(serve(args))
    except TdaskError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
