"""filip_image: images (exactly one of IMAGE or PIXEL_VALUES per request) -> token and pooled embeddings.

The Triton Python-backend model is filip_engine.adapters.ImageModel."""
from filip_engine.adapters import ImageModel as TritonPythonModel  # noqa: F401
