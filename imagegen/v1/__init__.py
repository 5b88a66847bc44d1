"""Generated protobuf/gRPC code of the imagegen.v1 API; rebuild with `python tools/gen_protos.py`.

Here: the internal stage APIs (encoder, denoiser, VAE). The public API lives once, in the client distribution
(`imagegen_client.v1`); it is importable here too, under the same module objects, because the internal stubs
import `imagegen.v1.common_pb2` and the descriptor pool must not see a second copy.
"""

import sys

from imagegen_client.v1 import common_pb2, common_pb2_grpc, image_service_pb2, image_service_pb2_grpc

for _module in (common_pb2, common_pb2_grpc, image_service_pb2, image_service_pb2_grpc):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
