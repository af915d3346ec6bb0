"""Expert replicas: SwiGLU expert math, the ExpertService gRPC server, the Serve deployment."""
