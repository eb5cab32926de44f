"""The peer servers of benchmarks/peer_comparison.py, each serving the same package as the service."""
