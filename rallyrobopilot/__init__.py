"""Generated gRPC contracts of RallyRoboPilot; do not edit."""
