"""Generated protobuf and gRPC code for the ecserve.v1 API (protos/generate.py)."""
