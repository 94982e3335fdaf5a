"""Artifact I/O: atomic outputs, npz image shards with hashed manifests, models,
and object storage (`s3://` paths, `storage`)."""
