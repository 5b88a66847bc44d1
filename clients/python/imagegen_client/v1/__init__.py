"""Generated protobuf/gRPC code of the public imagegen.v1 API; rebuild with `python tools/gen_protos.py`."""
