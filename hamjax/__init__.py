"""hamjax: fair and efficient adversarial training in JAX/Flax."""

__version__ = "0.1.0"
