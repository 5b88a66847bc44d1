"""`imagegen serve {gateway,encoder,denoiser,vae,all}`: parse the flags (each also read from its IMAGEGEN_*
variable; docs/services.md is the contract), then run until SIGTERM."""

from __future__ import annotations

import argparse


def add_serve_parser(subcommands: argparse._SubParsersAction) -> None:
    from imagegen.services.flags import add_service_parsers

    serve_parser = subcommands.add_parser("serve", help="start a service, or all of them in one process")
    add_service_parsers(serve_parser.add_subparsers(dest="service", required=True))


def serve(args: argparse.Namespace) -> int:
    """Run the chosen service(s); returns the process exit status. Configuration errors raise ImagegenError."""
    import asyncio
    from dataclasses import replace

    from imagegen.common.kernels import configure_compiler
    from imagegen.common.serving.exposure import resolve_exposure
    from imagegen.common.serving.hosting import HostedModel, pin_torch_threads
    from imagegen.common.serving.logs import configure_logging
    from imagegen.common.serving.server import serve as run_servers
    from imagegen.common.serving.tls import TlsConfig
    from imagegen.services.all_in_one import endpoints

    configure_logging(args.log_level, args.service)
    pin_torch_threads(args.torch_threads)  # process-wide settings: once, before any stage (thread) starts
    configure_compiler(args.cache_dir)
    if args.service == "denoiser":
        from imagegen.common.parallel.launch import is_torchrun_follower

        if is_torchrun_follower():  # rank 0 of the torchrun group serves; the others follow it
            from imagegen.services.denoiser_config import DenoiserConfig
            from imagegen.services.denoiser_engine import follow

            model = HostedModel.from_args(args)
            return follow(DenoiserConfig.from_flags(args, model))  # the same GroupSpec rank 0 builds
    # Closed by default (issue 20): loopback unless --host; beyond it only with credentials or an explicit opt-in.
    token = resolve_exposure(args)
    tls = replace(TlsConfig.from_args(args.tls_cert, args.tls_key, args.tls_ca), internal_token=token)
    servers = run_servers(
        endpoints(args, tls), args.drain_timeout, args.metrics_host, args.metrics_port, args.health_port, args.host
    )
    return asyncio.run(servers)
