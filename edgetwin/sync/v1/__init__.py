"""Code generated from protos/edgetwin/sync/v1/sync.proto by scripts/gen-protos."""
