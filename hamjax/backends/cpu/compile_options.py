"""XLA compile options for the programs hamjax jits, and `jit`, which passes them.

On the CPU backend, recent jaxlibs hand convolutions (and dots) to YNNPACK fusions. On the 2-core
AVX2 machine docs/performance.md quotes, those ran PreAct-ResNet-18's convolutions 1.7-2.3x slower
than XLA's own Eigen kernels and its weight gradients 5x slower (docs/performance.md "What the
CPU needs"), so hamjax compiles with the YNNPACK fusions off where its per-ISA table says so
(`choices.cpu_choices().ynn_fusions`). Nothing changes on GPU/TPU, on a jaxlib without the
option, or when the user's XLA_FLAGS already chooses the fusions.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hamjax.backends.cpu.choices import cpu_choices

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# An empty list of fusion types: no op is handed to YNNPACK; convs and dots run on Eigen.
CPU_OPTIONS = {YNN_FUSION_OPTION: ""}


def _accepted(options: dict[str, str]) -> bool:
    """Whether this jax/jaxlib compiles with `options` (older ones lack `compiler_options` or
    the option itself)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
    except (TypeError, ValueError, RuntimeError):  # JaxRuntimeError is a RuntimeError
        return False
    return True


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """The options hamjax compiles with on this backend; None where XLA's defaults stand.

    Pass them to your own jits of hamjax steps: `jax.jit(step, compiler_options=
    hamjax.compiler_options())`, or use `hamjax.jit`.
    """
    if jax.default_backend() != "cpu":
        return None
    if YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None  # the user's own choice stands
    if cpu_choices().ynn_fusions:
        return None  # measured faster with them on this ISA: XLA's defaults
    return dict(CPU_OPTIONS) if _accepted(CPU_OPTIONS) else None


def jit(fun: Callable, **jit_kwargs: Any) -> Any:
    """`jax.jit` with `compiler_options()` (where there are any)."""
    options = compiler_options()
    if options is not None:
        jit_kwargs.setdefault("compiler_options", options)
    return jax.jit(fun, **jit_kwargs)
