"""The gRPC front end: proto <-> engine types, the servicer, the async engine loop, the server."""
