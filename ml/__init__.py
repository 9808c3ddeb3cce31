"""Flywheel's model core: the transformer, sampling, checkpoints, tokenizer, data and trainers (pure torch)."""
