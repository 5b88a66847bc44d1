"""Generated protobuf/gRPC code of the imagegen.v1 API; rebuild with `python tools/gen_protos.py`."""
