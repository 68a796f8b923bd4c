"""hamjax: fair and efficient adversarial training in JAX/Flax."""

__version__ = "0.1.0"

from hamjax.compile_options import compiler_options  # noqa: E402

__all__ = ["compiler_options"]
