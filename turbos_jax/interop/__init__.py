"""Checkpoint interoperability: Hugging Face hybrid models in and out (`hf.load`, `hf.export`)."""
