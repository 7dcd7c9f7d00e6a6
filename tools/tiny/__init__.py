"""Training pagedlm's shipped code models and its own scaling-law runs (tools/train_tiny.py)."""
