"""`imagegen` command line: generate/edit in one process (or against a gateway), build tiny checkpoints,
and start services.

Every failure the user can fix (a bad option, a missing file, an unusable model folder) ends the command with
one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2

DEFAULTS_HELP = """\
Defaults (each equals the diffusers 0.42.1 pipeline's default for the family):
  qwen-image            steps 50, guidance (true_cfg_scale) 4.0, 1024x1024, max sequence length 512,
                        no negative prompt (so no CFG unless --negative-prompt is given)
  qwen-image-edit(-plus) steps 50, guidance (true_cfg_scale) 4.0, size from the (last) input image at about
                        1024x1024 pixels, no negative prompt
  z-image               steps 50, guidance 5.0 (CFG on when > 0, negative prompt "" by default),
                        1024x1024, max sequence length 512, cfg normalization off, cfg truncation 1.0
  qwen-image-2.1        steps 40 (Turbo: its stored sigma grid, whatever --steps says), guidance
                        (true_cfg_scale) 1.0, so no CFG unless --guidance-scale > 1 and --negative-prompt;
                        1024x1024, width and height multiples of 32; RGBA output
  A model folder's imagegen.json (e.g. {"steps": 8, "guidance_scale": 0.0} for Z-Image-Turbo) replaces these;
  published Z-Image-Turbo folders have none: add it, or pass --steps 8 --guidance-scale 0.
The seed defaults to a random one, printed so that the image can be reproduced.
"""


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    from imagegen.common.families import FAMILIES
    from imagegen.common.serving.config import add_flag, env_bool, non_negative_int
    from imagegen.common.stage_settings import COLLECTIVE_TIMEOUT_S, DEFAULT_CACHE_ROOT

    parser.add_argument("--model", help="diffusers-format model folder (default: a tiny demo checkpoint)")
    parser.add_argument(
        "--family", choices=list(FAMILIES), help="with no --model: which tiny demo checkpoint to build and use"
    )
    parser.add_argument("--target", help="HOST:PORT of a running gateway; default: run in this process")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", help="enables CFG (Qwen: with --guidance-scale > 1)")
    parser.add_argument("--width", type=int, help="multiple of 16 (qwen-image-2.1: 32)")
    parser.add_argument("--height", type=int, help="multiple of 16 (qwen-image-2.1: 32)")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument(
        "--guidance-scale", type=float, help="true_cfg_scale for the Qwen families, guidance_scale for Z-Image"
    )
    parser.add_argument("--cfg-normalization", type=float, help="Z-Image: clip the guided norm to X * ||positive||")
    parser.add_argument("--cfg-truncation", type=float, help="Z-Image: no CFG on steps with (1000 - t)/1000 > X")
    parser.add_argument("--max-sequence-length", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (default: float32)")
    parser.add_argument("--sp", type=int, default=1, help="sequence-parallel degree (processes on this machine)")
    parser.add_argument(
        "--ulysses",
        type=int,
        help="Ulysses degree U of --sp P = U x R ring ranks; U must divide P and the model's heads "
        "(default: the largest that does)",
    )
    parser.add_argument("--cfg-parallel", action="store_true", help="run the CFG branches on separate processes")
    parser.add_argument(
        "--collective-timeout",
        type=float,
        default=COLLECTIVE_TIMEOUT_S,
        help="seconds before a stuck process group fails",
    )
    add_flag(
        parser,
        "--kernels",
        "IMAGEGEN_KERNELS",
        None,
        "denoiser kernels: fast or reference (bitwise equal to diffusers on the same GPU); default fast on cuda, "
        "reference on cpu",
        choices=["fast", "reference"],
    )
    add_flag(
        parser,
        "--compile",
        "IMAGEGEN_COMPILE",
        None,
        "compile the fast path: auto (default) only when this machine's compiler cache holds the model's graphs "
        "and the job is long enough to repay it",
        choices=["auto", "on", "off"],
    )
    add_flag(parser, "--cuda-graphs", "IMAGEGEN_CUDA_GRAPHS", "on", "replay forwards as CUDA graphs", type=env_bool)
    add_flag(
        parser, "--ring-merge", "IMAGEGEN_RING_MERGE", "ordered", "ring attention merge", choices=["ordered", "lse"]
    )
    add_flag(parser, "--cache-dir", "IMAGEGEN_CACHE", DEFAULT_CACHE_ROOT, "compiler caches and tiny demo checkpoints")
    add_flag(
        parser,
        "--torch-threads",
        "IMAGEGEN_TORCH_THREADS",
        0,
        "torch intra-op threads (every process of a group); 0 keeps torch's default",
        type=non_negative_int,
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME_OR_PATH[:SCALE]",
        help="LoRA adapter (repeatable): a name from --lora-dir (or the gateway's denoiser with --target) or a "
        ".safetensors file, with its scale (default 1.0)",
    )
    parser.add_argument("--lora-dir", help="folder of NAME.safetensors adapters (and NAME.json defaults) for --lora")
    parser.add_argument("--api-key", default=os.environ.get("IMAGEGEN_API_KEY"), help="with --target")
    parser.add_argument(
        "--output", required=True, help="PATH.png/.jpg/.webp ({i} numbers several images) or PATH.npy (float32)"
    )


def build_parser() -> argparse.ArgumentParser:
    from imagegen.common.families import FAMILIES

    parser = argparse.ArgumentParser(prog="imagegen", description="Diffusion image generation, exact to diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="text to image",
        epilog=DEFAULTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_request_options(generate)

    edit = commands.add_parser(
        "edit",
        help="edit images with a prompt",
        epilog=DEFAULTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    edit.add_argument("--image", action="append", required=True, help="input image (repeat for Edit-Plus)")
    _add_request_options(edit)

    tiny = commands.add_parser("make-tiny", help="build a tiny random-weight checkpoint of the real classes")
    tiny.add_argument("--family", required=True, choices=list(FAMILIES))
    tiny.add_argument(
        "--variant",
        help="z-image: turbo (with imagegen.json: 8 steps, guidance 0); qwen-image-2.1: turbo (its sigma grid); "
        "qwen-image-edit-plus: 2511",
    )
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)

    lora = commands.add_parser("make-tiny-lora", help="write a random LoRA adapter for a (tiny) checkpoint")
    lora.add_argument("--model", required=True, help="diffusers-format model folder")
    lora.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    lora.add_argument("--rank", type=int, default=4)
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument(
        "--format", choices=["peft", "kohya"], default="peft", help="diffusers/PEFT keys or the kohya layout"
    )

    from imagegen.services.cli import add_serve_parser

    add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from imagegen.common.errors import ImagegenError

    try:
        if args.command == "make-tiny":
            return _make_tiny(args)
        if args.command == "make-tiny-lora":
            return _make_tiny_lora(args)
        if args.command == "serve":
            from imagegen.services.cli import serve

            return serve(args)
        return _generate(args)
    except ImagegenError as exc:
        print(f"imagegen: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("imagegen: interrupted", file=sys.stderr)
        return 130


def _make_tiny(args: argparse.Namespace) -> int:
    from imagegen.common.errors import InvalidArgument
    from imagegen.common.tiny import build_tiny_checkpoint

    try:
        path = build_tiny_checkpoint(args.family, args.out, seed=args.seed, variant=args.variant)
    except ValueError as exc:
        raise InvalidArgument("variant" if args.variant else "family", str(exc)) from exc
    print(path)
    return 0


def _make_tiny_lora(args: argparse.Namespace) -> int:
    from imagegen.common.errors import InvalidArgument
    from imagegen.common.lora.tiny import make_tiny_lora

    if args.rank < 1:
        raise InvalidArgument("rank", f"must be at least 1, got {args.rank}")
    try:
        path = make_tiny_lora(args.model, args.out, rank=args.rank, seed=args.seed, fmt=args.format)
    except (ValueError, OSError) as exc:
        raise InvalidArgument("model" if Path(args.out).suffix == ".safetensors" else "out", str(exc)) from exc
    print(path)
    return 0


def _request_options(args: argparse.Namespace):
    from imagegen.common.options import RequestOptions

    return RequestOptions(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        cfg_normalization=args.cfg_normalization,
        cfg_truncation=args.cfg_truncation,
        max_sequence_length=args.max_sequence_length,
        seed=args.seed,
        num_images=args.num_images,
    )


def _generate(args: argparse.Namespace) -> int:
    from imagegen.common.errors import InvalidArgument
    from imagegen.common.images import OUTPUT_SUFFIXES, load_image_file, write_outputs

    suffix = Path(args.output).suffix.lower()
    if suffix not in {*OUTPUT_SUFFIXES, ".npy"}:
        raise InvalidArgument("output", f"unsupported suffix {suffix!r}: use .png, .jpg, .webp or .npy")
    images = [load_image_file(p) for p in getattr(args, "image", None) or []]
    options = _request_options(args)
    if args.target:
        array = _run_remote(args, options, images)
    else:
        array = _run_local(args, options, images)
    if array is None:  # a torchrun rank other than 0: rank 0 writes the output
        return 0
    for path in write_outputs(array, args.output):
        print(path)
    return 0


def _run_remote(args: argparse.Namespace, options, images):
    """`--target HOST:PORT`: the same request through a gateway; float32 `[K, H, W, 3]`."""
    from imagegen_client.sdk import ImageClient

    from imagegen.common.lora.registry import parse_lora
    from imagegen.common.serving.convert import OPTION_FIELDS

    fields = {name: getattr(options, name) for name in (*OPTION_FIELDS, "num_images")}
    fields["loras"] = [parse_lora(value, i) for i, value in enumerate(args.lora)]
    trusted = os.environ.get("IMAGEGEN_ALLOW_PLAINTEXT_KEY") == "1"  # the CLI's way to say the network is trusted
    with ImageClient(args.target, api_key=args.api_key, model=args.model, allow_plaintext_key=trusted) as client:
        if images:
            result = client.edit(images, options.prompt, output_format="npy", **fields)
        else:
            result = client.generate(options.prompt, output_format="npy", **fields)
    print(f"seed {result.seed}", file=sys.stderr)
    return result.array


def _run_local(args: argparse.Namespace, options, images):
    from imagegen.common.errors import InvalidArgument

    if args.sp < 1:
        raise InvalidArgument("sp", f"must be at least 1, got {args.sp}")
    model = args.model or str(_demo_checkpoint(args))
    from imagegen.common.kernels import configure_compiler
    from imagegen.common.parallel.launch import (
        follow_as_rank,
        group_denoiser,
        is_torchrun_follower,
        launched_by_torchrun,
    )
    from imagegen.common.parallel.spec import GroupSpec
    from imagegen.common.serving.hosting import pin_torch_threads

    configure_compiler(args.cache_dir)  # start-up, before any stage runs
    pin_torch_threads(args.torch_threads)
    settings = _stage_settings(args)
    spec = GroupSpec.from_flags(args, model, args.dtype, args.device, settings)  # every rank gets all of it
    if is_torchrun_follower():  # under torchrun, rank 0 runs the pipeline and writes the output
        follow_as_rank(spec)
        return None
    if args.sp > 1 or args.cfg_parallel or launched_by_torchrun():
        with group_denoiser(spec) as group:
            return _run_pipeline(model, options, images, args, settings, denoiser=group)
    return _run_pipeline(model, options, images, args, settings)


def _stage_settings(args: argparse.Namespace):
    from imagegen.common.stage_settings import StageSettings

    return StageSettings(
        kernels=args.kernels, compile=args.compile, cuda_graphs=args.cuda_graphs, cache_root=args.cache_dir
    )


def _run_pipeline(model: str, options, images, args: argparse.Namespace, settings, denoiser=None):
    import torch

    from imagegen.common.denoise import StepHooks
    from imagegen.common.lora.registry import parse_lora
    from imagegen.common.pipeline import Pipeline

    torch.set_grad_enabled(False)
    pipeline = Pipeline(
        model,
        dtype=args.dtype,
        device=args.device,
        denoiser=denoiser,
        lora_dir=args.lora_dir,
        settings=settings,
    )
    loras = [parse_lora(value, i) for i, value in enumerate(args.lora)]
    resolved = pipeline.resolve(pipeline.with_lora_defaults(options, loras), images)
    print(f"seed {resolved.seed}", file=sys.stderr)
    options = dataclasses.replace(options, seed=resolved.seed)
    with _progress(resolved.steps) as progress:
        return pipeline(options, images, StepHooks(on_step=progress), loras=loras)


def _demo_checkpoint(args: argparse.Namespace) -> Path:
    from imagegen.common.tiny import tiny_checkpoint_cached

    family = args.family or ("qwen-image-edit" if args.command == "edit" else "qwen-image")
    return tiny_checkpoint_cached(family, cache_dir=str(Path(args.cache_dir) / "tiny"))


class _progress:
    """A tqdm bar over the denoising steps when stderr is a terminal; silent otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = None

    def __enter__(self):
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="denoising", unit="step", file=sys.stderr)
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
