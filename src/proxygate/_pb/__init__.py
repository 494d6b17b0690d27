"""Generated gRPC stubs for proto/inference.proto (make proto); do not edit."""
