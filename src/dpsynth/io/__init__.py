"""Artifact I/O: atomic outputs, npz image shards with hashed manifests, models,
and object storage for `s3://` paths (`s3`, `cache`, `published`, `work`)."""
