"""How the real services start: locally (``infra.services``, ``python -m infra``) and in production (compose.yaml)."""
