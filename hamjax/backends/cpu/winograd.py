"""3x3 stride-1 convolutions as Winograd F(2x2, 3x3): 16 matrix products instead of 36 multiplies
per output pair, for the canonical conv on CPUs where it pays (`model.conv_vjp`).

Why: on an AVX-512 EPYC (Zen 4) XLA's Eigen convolutions already run near the cores' nominal
peak, and eager PyTorch's oneDNN kernels still beat the jitted PreAct-ResNet-18 step there
(`benchmarks/conv_kernels_ab.py`). Fewer multiplies is the one way left: F(2x2, 3x3) computes
each 2x2 output tile from a 4x4 input tile with 16 products per channel pair instead of 36 (Lavin
& Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016), so the conv becomes 16
independent (pixels/4 x C) @ (C x O) products on Eigen's GEMM plus cheap linear transforms.

The transforms are memory-bound (they read and write every activation a few times), the products
are not, and the kernel's transform costs the same however few pixels share it, so it pays only
where the channels are many and the pixels not too few: `applies` takes convs whose input and
output channels are both at least `MIN_CHANNELS` and whose input holds at least `MIN_PIXELS`
positions (batch x height x width; the per-stage A/B in `benchmarks/conv_kernels_ab.py`:
PreAct-ResNet-18's 64-channel stage runs slower this way at batch 32, its 128-512-channel
stages faster; its 4x4x512 stage slower at batch 4, 64 positions, and even at batch 8).
Float32 only: the transforms' rounding is ~1e-6 relative there (tests/test_cpu_winograd.py),
bfloat16's would be ~1e-2.

Every step is plain jnp (slices, adds, dots), so autodiff, vmap and jvp work; the canonical conv
uses it for the forward pass and for the input gradient (itself a 3x3 stride-1 correlation with
the kernel reversed), and keeps its Eigen conv for the weight gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Lavin & Gray's F(2x2, 3x3) matrices: V = B^T d B (input tile), U = G g G^T (kernel),
# Y = A^T (U . V) A (output tile).
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
MIN_CHANNELS = 128
MIN_PIXELS = 256  # batch x height x width of the conv's input as traced (global under jit)


def applies(x_shape, w_shape, strides, padding, dtype) -> bool:
    """Whether the conv of x (NHWC) with w (HWIO) is one this module computes and where it pays:
    a 3x3 kernel, stride 1, padding 1 on every side, float32, at least `MIN_CHANNELS` input and
    output channels and `MIN_PIXELS` input positions."""
    return (tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
            and jnp.dtype(dtype) == jnp.float32 and len(x_shape) == 4
            and min(w_shape[2], w_shape[3]) >= MIN_CHANNELS
            and x_shape[0] * x_shape[1] * x_shape[2] >= MIN_PIXELS)


def _combine(coefficients, parts):
    """sum_i c_i * parts[i], skipping zero coefficients and multiplying by none of +-1 (the
    transforms' entries are 0, +-1 and +-0.5, so this is adds and a few halvings)."""
    total = None
    for c, part in zip(coefficients, parts, strict=True):
        if c == 0:
            continue
        term = part if c == 1 else -part if c == -1 else float(c) * part
        total = term if total is None else total + term
    return total


def _input_tiles(x: jax.Array) -> list[list[jax.Array]]:
    """V[a][b] (B, H/2, W/2, C) for the 16 positions of the 4x4 tile transform, computed
    separably (rows, then columns) from contiguous slices of x padded by one (no gathers, no
    concatenation: each V[a][b] feeds its own matrix product). H and W must be even."""
    b, h, w, c = x.shape
    th, tw = h // 2, w // 2
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    row_blocks = padded.reshape(b, th + 1, 2, w + 2, c)  # tile row t spans blocks t and t+1
    rows = [row_blocks[:, i // 2:i // 2 + th, i % 2] for i in range(4)]
    tiles = []
    for a in range(4):
        col_blocks = _combine(B_T[a], rows).reshape(b, th, tw + 1, 2, c)
        cols = [col_blocks[:, :, j // 2:j // 2 + tw, j % 2] for j in range(4)]
        tiles.append([_combine(B_T[col], cols) for col in range(4)])
    return tiles


def _kernel_tiles(w: jax.Array) -> list[list[jax.Array]]:
    """U[a][b] = (G w G^T)[a, b] over w's first two (spatial) axes, separably."""
    rows = [_combine(G[a], [w[i] for i in range(3)]) for a in range(4)]  # (3, C, O) each
    return [[_combine(G[col], [rows[a][j] for j in range(3)]) for col in range(4)]
            for a in range(4)]


def _output(products: list[list[jax.Array]]) -> jax.Array:
    """The conv's output (B, H, W, O) from the 16 products M[a][b] (B, H/2, W/2, O): Y = A^T M A
    per tile, its 2x2 outputs interleaved back into rows and columns."""
    rows = [[_combine(A_T[p], [products[a][col] for a in range(4)]) for col in range(4)]
            for p in range(2)]
    phases = [jnp.stack([_combine(A_T[q], rows[p]) for q in range(2)], axis=3) for p in range(2)]
    y = jnp.stack(phases, axis=2)  # B, H/2, 2, W/2, 2, O
    b, th, _, tw, _, o = y.shape
    return y.reshape(b, 2 * th, 2 * tw, o)


def winograd_conv3x3(x: jax.Array, w: jax.Array, kernel_layout: str = "HWIO") -> jax.Array:
    """`lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))` in NHWC, by F(2x2, 3x3).
    `kernel_layout` "HWOI": w's channel axes are (output, input), e.g. a conv's kernel as its
    input gradient uses it; the products then contract w's last axis, which Eigen's GEMM does
    in place, where a swapped copy of a wide kernel cost 3x the whole correlation. An odd
    height or width is extended by a zero row or column at the end (the same conv on the rows
    kept) and the extra output sliced off."""
    if kernel_layout not in ("HWIO", "HWOI"):
        raise ValueError(f"kernel_layout={kernel_layout!r}: HWIO or HWOI")
    b, h, wd, c = x.shape
    o = w.shape[3] if kernel_layout == "HWIO" else w.shape[2]
    contract = 0 if kernel_layout == "HWIO" else 1  # u's axis holding x's channels
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, wd % 2), (0, 0)))
    v, u = _input_tiles(x), _kernel_tiles(w)
    th, tw = x.shape[1] // 2, x.shape[2] // 2
    products = [[jax.lax.dot_general(v[a][col].reshape(b * th * tw, c), u[a][col],
                                     (((1,), (contract,)), ((), ())),
                                     precision=jax.lax.Precision.HIGHEST).reshape(b, th, tw, o)
                 for col in range(4)] for a in range(4)]
    return _output(products)[:, :h, :wd]
