"""Each service's flags (docs/services.md), kept apart from the servicers so `imagegen --help` imports no torch."""

from __future__ import annotations

import argparse

from imagegen.common.serving.config import (
    add_cache_flags,
    add_common_flags,
    add_flag,
    add_model_flags,
    add_switch,
    env_bool,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from imagegen.common.stage_settings import COLLECTIVE_TIMEOUT_S, DEFAULT_LORA_CACHE_MB
from imagegen.services.security_flags import add_security_flags

# Batching defaults, measured (docs/benchmarks.md, one H200): on the fast path one request already keeps the card
# compute-bound at 512^2 and up, so batches of 8 were 2-7% slower than one at a time; batching stays opt-in.
CUDA_MAX_BATCH = 1
BATCH_WAIT_MS = 10.0

# service -> (default gRPC port, default metrics port)
HTTP_PORT = 8000  # the OpenAI-compatible API's port where it is on by default (`serve all`, the chart)
PORTS = {"gateway": (50051, 9100), "encoder": (50052, 9101), "denoiser": (50053, 9102), "vae": (50054, 9103)}
HELP = {
    "gateway": "public ImageService: validates, authenticates and routes requests through the stages",
    "encoder": "EncoderService: prompts (and edit images) -> embeddings, cached in Redis or an LRU",
    "denoiser": "DenoiserService: the denoise stage behind a bounded queue",
    "vae": "VaeService: edit images -> condition latents, latents -> images",
    "all": "all four services in one process (the stages on 127.0.0.1)",
}


def gateway_flags(parser: argparse.ArgumentParser, http_port: int = 0) -> None:
    for stage in ("encoder", "denoiser", "vae"):
        port = PORTS[stage][0]
        add_flag(
            parser, f"--{stage}", f"IMAGEGEN_{stage.upper()}_ADDR", f"127.0.0.1:{port}", f"{stage} of the default model"
        )
    add_flag(
        parser, "--routes", "IMAGEGEN_ROUTES", None, 'JSON {"MODEL_ID": {"encoder": "h:p", ...}} for several models'
    )
    add_flag(parser, "--default-model", "IMAGEGEN_DEFAULT_MODEL", None, "model for requests naming none")
    add_flag(parser, "--api-keys-file", "IMAGEGEN_API_KEYS_FILE", None, "one key per line; unset: no auth")
    add_flag(
        parser,
        "--http-port",
        "IMAGEGEN_HTTP_PORT",
        http_port,
        "port of the OpenAI-compatible HTTP API (same keys, limits and TLS as gRPC); 0: off",
        type=non_negative_int,
    )


def encoder_flags(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    add_cache_flags(parser)


def denoiser_flags(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    add_cache_flags(parser)  # the denoiser reads embeddings by key from the same Redis
    add_flag(parser, "--sp", "IMAGEGEN_SP", 1, "sequence-parallel degree P", type=positive_int)
    add_flag(
        parser,
        "--ulysses",
        "IMAGEGEN_ULYSSES",
        None,
        "Ulysses degree U of P = U x R ring ranks (U divides P and the heads; default: the largest that does)",
        type=positive_int,
    )
    add_switch(parser, "--cfg-parallel", "IMAGEGEN_CFG_PARALLEL", "run the two CFG branches on separate processes")
    add_flag(
        parser,
        "--collective-timeout",
        "IMAGEGEN_COLLECTIVE_TIMEOUT",
        COLLECTIVE_TIMEOUT_S,
        "seconds before a stuck rank fails the denoiser group",
        type=float,
    )
    add_flag(
        parser,
        "--queue-size",
        "IMAGEGEN_QUEUE_SIZE",
        16,
        "jobs that may wait; more answer RESOURCE_EXHAUSTED",
        type=positive_int,
    )
    add_flag(
        parser,
        "--max-batch",
        "IMAGEGEN_MAX_BATCH",
        None,
        "queued jobs that may share one denoiser forward (same size, steps, CFG, adapters); default 1 on cpu, "
        f"{CUDA_MAX_BATCH} on cuda",
        type=positive_int,
    )
    add_flag(
        parser,
        "--batch-wait-ms",
        "IMAGEGEN_BATCH_WAIT_MS",
        BATCH_WAIT_MS,
        "longest wait for compatible jobs to fill a batch (0: only those already queued)",
        type=non_negative_float,
    )
    add_flag(
        parser,
        "--kernels",
        "IMAGEGEN_KERNELS",
        None,
        "fast or reference (bitwise equal to diffusers on the same GPU); default fast on cuda, reference on cpu",
        choices=["fast", "reference"],
    )
    add_flag(
        parser,
        "--compile",
        "IMAGEGEN_COMPILE",
        "on",
        "compile the fast path's DiT blocks (on, off, or auto: only when the compiler cache is warm)",
        choices=["on", "off", "auto"],
    )
    add_flag(
        parser,
        "--warmup-sizes",
        "IMAGEGEN_WARMUP_SIZES",
        "default",
        "WIDTHxHEIGHT,... captured before SERVING (default: the family's default size and the HTTP API's "
        "advertised sizes; none). Other sizes are served at once: the compiled blocks serve every size",
    )
    add_flag(
        parser,
        "--lora-dir",
        "IMAGEGEN_LORA_DIR",
        None,
        "read-only folder of LoRA adapters: NAME.safetensors (requests name NAME), optional NAME.json defaults",
    )
    add_flag(
        parser,
        "--lora-cache-mb",
        "IMAGEGEN_LORA_CACHE_MB",
        DEFAULT_LORA_CACHE_MB,
        "loaded adapters kept on the device, least recently used dropped first (MiB)",
        type=positive_int,
    )
    add_flag(
        parser,
        "--cuda-graphs",
        "IMAGEGEN_CUDA_GRAPHS",
        "on",
        "replay the fast path's forwards as CUDA graphs (on or off)",
        type=env_bool,
    )
    add_flag(
        parser,
        "--ring-merge",
        "IMAGEGEN_RING_MERGE",
        "ordered",
        "ring attention: ordered (one process's bits) or lse (overlaps the exchange; float rounding)",
        choices=["ordered", "lse"],
    )
    add_default_flags(parser)


def add_default_flags(parser: argparse.ArgumentParser) -> None:
    """The model's request defaults (over `<model>/imagegen.json`; a request's own value wins)."""
    defaults = (
        ("--default-steps", "IMAGEGEN_DEFAULT_STEPS", "steps", positive_int),
        ("--default-guidance-scale", "IMAGEGEN_DEFAULT_GUIDANCE_SCALE", "guidance scale", float),
        ("--default-width", "IMAGEGEN_DEFAULT_WIDTH", "width (with --default-height)", positive_int),
        ("--default-height", "IMAGEGEN_DEFAULT_HEIGHT", "height (with --default-width)", positive_int),
        ("--default-negative-prompt", "IMAGEGEN_DEFAULT_NEGATIVE_PROMPT", "negative prompt (used with CFG)", str),
    )
    for flag, env, what, kind in defaults:
        help = f"{what} of a request that sets none; unset: imagegen.json beside the model, else the family's"
        add_flag(parser, flag, env, None, help, type=kind)


def vae_flags(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)


def all_flags(parser: argparse.ArgumentParser) -> None:
    gateway_flags(parser, http_port=HTTP_PORT)  # --encoder/--denoiser/--vae: where the stages listen; HTTP on
    denoiser_flags(parser)  # model, cache and queue flags: a superset of the encoder's and the VAE's


FLAGS = {
    "gateway": gateway_flags,
    "encoder": encoder_flags,
    "denoiser": denoiser_flags,
    "vae": vae_flags,
    "all": all_flags,
}


def add_service_parsers(services: argparse._SubParsersAction) -> None:
    for name, add in FLAGS.items():
        parser = services.add_parser(name, help=HELP[name], description=HELP[name])
        add_common_flags(parser, *PORTS[name if name != "all" else "gateway"])
        add(parser)
        add_security_flags(parser, name)  # issue 20: exposure, credentials, admission (services/security_flags.py)
