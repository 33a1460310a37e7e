"""FILIP inference engine (installed as ``filip_engine``): model, checkpoints, tokenizer,
preprocessing, scoring, search, runtimes, and the served models' code.

``filip_engine`` imports nothing from ``filip_export``, ``filip_client`` or the tools; it
shares the served contract (``filip_contract``) with the client.
"""
