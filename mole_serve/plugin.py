"""vLLM general plugin entry point (filled in by the serving work)."""


def register() -> None:
    """Called by vLLM in every process; must stay idempotent."""
