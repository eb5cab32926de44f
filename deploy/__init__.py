"""Deployment: building the Bentos and their container images, checking them, and the platform manifests."""
