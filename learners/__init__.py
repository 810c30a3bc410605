"""Meta-learning methods, one short module per method, composed from the ``bilevel`` core."""
__all__: list[str] = []
