"""A dataset version on storage: WebDataset shards, the commit protocol (index, card, manifest last), and the read
side (list, tag, verify, gc, diff)."""
