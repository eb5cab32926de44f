"""The BentoML service: HTTP and gRPC routes, batching, the model repository."""

# The project's version, read by pyproject.toml: a Bento or container image has no installed package metadata.
__version__ = "0.1.0"
