"""hamjax's XLA compile options: on the CPU the convolutions leave YNNPACK for Eigen and still
compute the same convolution (against a NumPy reference); the user's XLA_FLAGS and other
backends are left alone; an option this jaxlib lacks is detected, never passed. The CPU choices
are decided per ISA, each by its recorded A/B, and an unmeasured ISA is named."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np
import pytest

from hamjax.backends.cpu import compile_options, conv
from hamjax.backends.cpu.choices import FALLBACK_ISA, MEASURED, choices_for
from hamjax.backends.cpu.compile_options import (
    CPU_OPTIONS,
    YNN_FUSION_OPTION,
    compiler_options,
    jit,
)
from hamjax.backends.cpu.isa import isa_of


@pytest.fixture
def fresh_options():
    compiler_options.cache_clear()
    yield
    compiler_options.cache_clear()


def numpy_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """NHWC x HWIO cross-correlation by explicit sums over the kernel window."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = w.shape[0]
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]), np.float64)
    for i in range(k):
        for j in range(k):
            window = xp[:, i:i + stride * (out_h - 1) + 1:stride,
                        j:j + stride * (out_w - 1) + 1:stride]
            out += np.einsum("bhwc,co->bhwo", window, w[i, j])
    return out


@pytest.mark.parametrize("stride", [1, 2])
def test_jit_runs_the_same_convolution_off_ynnpack(stride):
    rs = np.random.RandomState(stride)
    # channel counts at which this jaxlib's defaults hand the conv to YNNPACK
    x = rs.randn(2, 8, 8, 16).astype(np.float32)
    w = rs.randn(3, 3, 16, 32).astype(np.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    jitted = jit(conv)
    np.testing.assert_allclose(jitted(x, w), numpy_conv(x, w, stride, 1), rtol=1e-4, atol=1e-4)
    if compiler_options() is not None:
        hlo = jitted.lower(x, w).compile().as_text()
        assert "convolution(" in hlo and "__ynn_fusion" not in hlo, hlo


def test_cpu_options_are_used_where_this_jaxlib_accepts_them(fresh_options):
    assert jax.default_backend() == "cpu"
    expected = CPU_OPTIONS if compile_options._accepted(CPU_OPTIONS) else None
    assert compiler_options() == expected


def test_an_option_the_jaxlib_lacks_is_not_accepted():
    assert not compile_options._accepted({"xla_cpu_no_such_option_in_any_jaxlib": ""})


def test_the_users_xla_flags_choice_stands(monkeypatch, fresh_options):
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN_FUSION_OPTION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert compiler_options() is None


def test_other_backends_keep_xla_defaults(monkeypatch, fresh_options):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compiler_options() is None
    jitted = jit(lambda x: x * 2)
    assert float(jitted(np.float32(2.0))) == 4.0


# ------------------------------------------------------------------ the per-ISA decisions
@pytest.mark.parametrize("flags, family, isa", [
    ({"avx2", "fma", "avx512f"}, 25, "avx512_on_256bit_pipes"),  # AMD Zen 4
    ({"avx2", "fma", "avx512f"}, None, "avx512"),  # Intel
    ({"avx2", "fma"}, 23, "avx2"),  # AMD Zen 2/3
    ({"avx", "sse4_2"}, None, "sse"),
])
def test_the_isa_is_read_from_cpuinfo_flags(flags, family, isa):
    assert isa_of(frozenset(flags), family) == isa


def test_every_measured_row_is_the_decision_of_its_recorded_ab():
    """A row of MEASURED stands on a committed cpu_choices_ab JSON of that ISA whose medians
    favour exactly the row's choices (rerun the A/B and update both together)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    for isa, row in MEASURED.items():
        assert row.measured and row.isa == isa
        record = json.loads((root / row.evidence).read_text())
        assert record["benchmark"] == "cpu_choices_ab" and record["cpu_isa"] == isa
        decision = record["decision"]
        assert (decision["ynn_fusions"], decision["conv_vjp"]) == (row.ynn_fusions, row.conv_vjp)
        # The canonical VJP's branches are the same on every ISA (hamjax.backends.cpu.conv): an
        # A/B that measured them must have favoured the shipped forms.
        assert decision.get("activation_flip") in (None, False)
        assert decision.get("strided_input_grad") in (None, "phased")
        # Winograd is on only where an A/B of it against the canonical conv favoured it.
        if row.winograd_evidence:
            record = json.loads((root / row.winograd_evidence).read_text())
            assert record["benchmark"] == "cpu_choices_ab" and record["cpu_isa"] == isa
            assert "canonical_winograd" in record["results"]["preact_resnet18"][
                "ratio_to_canonical_median"]
            assert record["decision"]["winograd"] == row.winograd
        else:
            assert not row.winograd


def test_an_unmeasured_isa_keeps_the_avx2_choices_and_says_so(caplog):
    choices_for.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="hamjax.backends.cpu.choices"):
            row = choices_for("isa_never_measured")
            again = choices_for("isa_never_measured")
    finally:
        choices_for.cache_clear()
    assert row is again and not row.measured and row.evidence == ""
    assert (row.ynn_fusions, row.conv_vjp) == (MEASURED[FALLBACK_ISA].ynn_fusions,
                                               MEASURED[FALLBACK_ISA].conv_vjp)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, "said once"
    assert "isa_never_measured" in warnings[0] and "cpu_choices_ab.py" in warnings[0]


def _decided(monkeypatch, **choices):
    row = dataclasses.replace(MEASURED[FALLBACK_ISA], **choices)
    monkeypatch.setattr(compile_options, "cpu_choices", lambda: row)
    monkeypatch.setattr(conv, "cpu_choices", lambda: row)


def test_an_isa_decided_for_ynnpack_compiles_with_xlas_defaults(monkeypatch, fresh_options):
    _decided(monkeypatch, ynn_fusions=True)
    assert compiler_options() is None


def test_auto_conv_vjp_follows_the_isas_decision(monkeypatch):
    _decided(monkeypatch, conv_vjp="xla")
    assert conv.conv_impl("auto") is jax.lax.conv_general_dilated
    assert conv.conv_impl("canonical") is conv.canonical_conv
    _decided(monkeypatch, conv_vjp="canonical")
    assert conv.conv_impl("auto") is conv.canonical_conv
    _decided(monkeypatch, conv_vjp="canonical", winograd=True)
    assert conv.conv_impl("auto").func is conv.canonical_conv
    assert conv.conv_impl("auto").keywords == {"winograd": True}
    assert conv.resolved_conv_vjp("auto") == "canonical_winograd"
    assert conv.resolved_conv_vjp("canonical") == "canonical"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv.resolved_conv_vjp("auto") == "xla"
    assert conv.conv_impl("xla") is jax.lax.conv_general_dilated
