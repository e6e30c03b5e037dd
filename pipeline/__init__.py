"""featcache pipeline: files -> images -> tensors -> features -> cache -> heads -> metrics."""
