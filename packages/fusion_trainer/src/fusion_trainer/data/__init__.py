"""From a dataset version to batches: shards streamed (webdataset + fsspec) with equal counts per rank, samples
decoded without pickle, normalised, tokenised (with a token-id cache) and collated with label masking."""
