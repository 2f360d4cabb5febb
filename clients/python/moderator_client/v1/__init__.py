"""Generated protobuf and gRPC code for moderator.v1 (make proto). Do not edit."""
