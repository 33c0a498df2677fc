"""Sentence embeddings for the services that compare texts: the semantic cache (its index) and the
gateway (its injection-similarity screen).

    embedder.py  MiniLMEmbedder: all-MiniLM-L6-v2, written here (torch; weights from an installed package)
    batcher.py   MicroBatcher: concurrent `embed(text)` calls share one forward pass (no torch)

Import from the module that holds the class: this package imports nothing, so a caller that only
batches does not pay for torch. It names the model, for the services that serve its vectors.
"""

MODEL_NAME = "all-MiniLM-L6-v2"     # what the Embed RPCs and /v1/embeddings call it
EMBEDDING_DIM = 384
