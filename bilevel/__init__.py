"""bilevel: bilevel optimization and meta-learning for PyTorch."""
__version__ = "0.1.0"
__all__ = ["__version__"]

# --- fewshot (issue 4): model files and the inference API -------------------------------
# bilevel.data (datasets, episodic samplers) and bilevel.models (backbones) are subpackages
# with their own __all__; they are not imported here to keep `import bilevel` light.
from bilevel.io import atomic_save, load, save_model  # noqa: E402

__all__ += ["atomic_save", "load", "save_model"]
# --- end fewshot ---------------------------------------------------------------------------
