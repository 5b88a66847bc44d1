"""Generated protobuf/gRPC code of the imagegen.v1 API; rebuild with `python tools/gen_protos.py`.

Here: the internal stage APIs (encoder, denoiser, VAE). The public API lives once, in the client distribution
(`imagegen_client.v1`), and the internal stubs import it from there. It is re-exported below so that one
`from imagegen.v1 import ...` names every message the server uses; they are the client's module objects (one copy
in the descriptor pool), not modules of this package.
"""

from imagegen_client.v1 import common_pb2, common_pb2_grpc, image_service_pb2, image_service_pb2_grpc

__all__ = ["common_pb2", "common_pb2_grpc", "image_service_pb2", "image_service_pb2_grpc"]
