"""What every branch shares: params loading, shards and manifests, resumable sharded
extraction, streaming, teacher loading, and the code deps of each stage."""
