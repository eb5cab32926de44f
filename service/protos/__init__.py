"""The Open Inference Protocol's gRPC messages and service (grpc_service.proto) and their generated Python modules."""
