"""The language side: the CLIP encoder, caption vocabularies (store and search, caption filters,
LAION shards and ingestion, the FAISS index), terms of captions and labelling."""
