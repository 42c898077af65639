"""The data plane: the chunked fetch/save pipeline, its fixed buffers, and where it runs (fetch modes)."""
