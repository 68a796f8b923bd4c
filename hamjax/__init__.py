"""hamjax: fair and efficient adversarial training in JAX/Flax."""

__version__ = "0.1.0"

from hamjax.backends.cpu.compile_options import compiler_options, jit  # noqa: E402

__all__ = ["compiler_options", "jit"]
