"""The gRPC services: thin servicers over `common.serving`. Start them with `imagegen serve ...`."""
