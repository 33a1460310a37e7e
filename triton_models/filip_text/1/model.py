"""filip_text: texts -> token and pooled embeddings.

The Triton Python-backend model is filip_engine.adapters.TextModel."""
from filip_engine.adapters import TextModel as TritonPythonModel  # noqa: F401
