"""filip_score: scores between given embeddings: late interaction (token) or pooled cosine (global).

The Triton Python-backend model is filip_engine.adapters.ScoreModel."""
from filip_engine.adapters import ScoreModel as TritonPythonModel  # noqa: F401
