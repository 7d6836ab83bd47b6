"""unify-dist: one model trained by data owners who keep their data, unified after every local epoch."""

__version__ = "0.1.0"
__all__ = ["__version__"]
