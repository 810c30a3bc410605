"""Meta-learning methods, one short module per method, composed from the ``bilevel`` core.

``LEARNERS`` is the registry of the built-in methods: one line per method, mapping its command
name to its class. The ``bilevel.learners`` entry point of this project (``pyproject.toml``)
points here, so ``bilevel <name> train|eval``, checkpoints and :func:`bilevel.load` find them;
the classes are imported only when their name is used.
"""
LEARNERS: dict[str, str] = {
    "maml": "learners.maml:MAML",
    "meta-sgd": "learners.meta_sgd:MetaSGD",
    "meta-curvature": "learners.meta_curvature:MetaCurvature",
    "meta-lstm": "learners.meta_lstm:MetaLSTM",
    "hyper-repr": "learners.hyper_repr:HyperRepr",
    "anil": "learners.anil:ANIL",
    "imaml": "learners.imaml:IMAML",
    "metaoptnet": "learners.metaoptnet:MetaOptNet",
    "reptile": "learners.reptile:Reptile",
}

__all__ = ["LEARNERS"]
