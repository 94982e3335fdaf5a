"""Artifact I/O: atomic outputs, npz image shards with hashed manifests, models."""
