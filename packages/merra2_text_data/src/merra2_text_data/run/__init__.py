"""Where a build's units of work run: shard tasks, the runner (this process, a LocalCluster or a scheduler), and the
per-day regional cube that cluster builds keep in the cache."""
