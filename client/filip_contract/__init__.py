"""The served contract, declared once (numpy only)."""
