"""The gRPC services: thin servicers over `imagegen.common.serving`. Start them with `imagegen serve ...`."""
