"""Model loading: default alias, local folders, GGUF files and hub ids (see loader.py)."""

from mlxpt.models.loader import DEFAULT_ALIAS, load, load_tokenizer, resolve

__all__ = ["DEFAULT_ALIAS", "load", "load_tokenizer", "resolve"]
