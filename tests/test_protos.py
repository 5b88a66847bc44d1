"""The generated gRPC code matches the protos, and the public API carries every option the CLI has."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from imagegen.cli import build_parser
from imagegen.common.options import RequestOptions
from imagegen.v1 import common_pb2, image_service_pb2

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_not_stale():
    generator = _generator()
    assert generator.proto_files(), "no protos found"
    stale = generator.stale_files()
    assert not stale, f"regenerate with `python tools/gen_protos.py`: stale {stale}"


def test_every_proto_has_its_generated_modules():
    generator = _generator()
    generated = {p.name for p in generator.generated_files()}
    for proto in generator.proto_files():
        assert {f"{proto.stem}_pb2.py", f"{proto.stem}_pb2_grpc.py"} <= generated, proto.name


def test_requests_carry_every_cli_option():
    options = {f.name for f in dataclasses.fields(RequestOptions)}
    generate = build_parser().parse_args(["generate", "--prompt", "p", "--output", "o.png"])
    cli_options = {name for name in vars(generate) if name in options}
    assert cli_options == options  # the CLI exposes exactly the request options
    for message in (image_service_pb2.GenerateImageRequest, image_service_pb2.EditImageRequest):
        fields = set(message.DESCRIPTOR.fields_by_name)
        assert options | {"request_id", "model", "output_format"} <= fields, message.DESCRIPTOR.name
    assert "images" in image_service_pb2.EditImageRequest.DESCRIPTOR.fields_by_name
    # Generate and Edit share field numbers, so one conversion serves both.
    generate_fields = image_service_pb2.GenerateImageRequest.DESCRIPTOR.fields_by_name
    edit_fields = image_service_pb2.EditImageRequest.DESCRIPTOR.fields_by_name
    assert all(edit_fields[name].number == field.number for name, field in generate_fields.items())


def test_output_formats_and_service_surface():
    assert set(common_pb2.OutputFormat.keys()) == {
        "OUTPUT_FORMAT_UNSPECIFIED",
        "OUTPUT_FORMAT_PNG",
        "OUTPUT_FORMAT_JPEG",
        "OUTPUT_FORMAT_WEBP",
        "OUTPUT_FORMAT_NPY",
    }
    methods = {m.name: m for m in image_service_pb2.DESCRIPTOR.services_by_name["ImageService"].methods}
    assert {"GenerateImage", "EditImage", "GenerateImageStream", "EditImageStream"} <= set(methods)
    assert methods["GenerateImageStream"].server_streaming and not methods["GenerateImage"].server_streaming
    assert image_service_pb2.DESCRIPTOR.package == "imagegen.v1"


def test_public_stubs_have_one_copy_in_the_client_distribution():
    import imagegen_client.v1.common_pb2
    import imagegen_client.v1.image_service_pb2

    import imagegen.v1
    from imagegen.v1 import denoiser_pb2, encoder_pb2_grpc, vae_pb2

    # imagegen.v1 re-exports the client's modules (one set of classes, one descriptor-pool entry) without posing
    # as their package: no imagegen.v1.common_pb2 module exists, and the internal stubs import the client's.
    assert common_pb2 is imagegen_client.v1.common_pb2 and image_service_pb2 is imagegen_client.v1.image_service_pb2
    assert image_service_pb2.GenerateImageRequest.__module__ == "imagegen_client.v1.image_service_pb2"
    assert importlib.util.find_spec("imagegen.v1.common_pb2") is None
    assert not any(name.startswith("imagegen.v1.") and "common" in name for name in sys.modules)
    for stub in (denoiser_pb2, encoder_pb2_grpc, vae_pb2):
        assert stub.imagegen_dot_v1_dot_common__pb2 is imagegen_client.v1.common_pb2, stub.__name__
    assert set(imagegen.v1.__all__) == {"common_pb2", "common_pb2_grpc", "image_service_pb2", "image_service_pb2_grpc"}
