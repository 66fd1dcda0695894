"""Data: JSONL, TFDS and HF sources, encoding with chat templates, token stores on disk,
batching, packing, mixtures.

Nothing here knows a model, a policy or the playground: they hand this package files and
tokenizers.
"""

SPLITS = ('train', 'eval')  # Every source has both; a split's index seeds its random draws.
