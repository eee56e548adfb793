"""leanlm::linear_int8 (engine/kernels/linear_int8.cpp): int8 codes times inputs rounded to int8 per 32.

Its result is defined exactly: the dequantized weight (codes times the row scales) times the inputs rounded
per block of 32. Both paths (AVX512-VNNI with codes offset by 128, AVX2 with signs moved onto the inputs)
compute every block's integer sum exactly, so each must agree with a float64 emulation to float32
accumulation error, and the emulation differs from the unrounded product by far more.
"""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import rounded_inputs
from leanlm.engine import kernels
from leanlm.transforms.quantize.int8 import Int8Linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanlm's CPU kernels are not built here")
PATHS = [pytest.param(True, id="avx512-vnni"), pytest.param(False, id="avx2")]


def skip_missing(avx512: bool):
    if avx512 and not kernels.has_avx512(vnni=True):
        pytest.skip("this CPU has no AVX512-VNNI")


@pytest.mark.parametrize("avx512", PATHS)
@pytest.mark.parametrize("in_features", [32, 96, 576, 1536])  # 32 and 96: the VNNI path's half step at the end
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11, 16])
def test_kernel_equals_the_emulation(avx512, in_features, rows):
    skip_missing(avx512)
    gen = torch.Generator().manual_seed(rows * in_features)
    x = torch.randn(rows, in_features, generator=gen) * torch.rand(1, in_features, generator=gen) * 3
    if in_features > 32:
        x[0, :32] = 0  # an all-zero block: step 0
    codes = torch.randint(-127, 128, (37, in_features), generator=gen, dtype=torch.int8)  # 37: tail rows
    codes[0] = -127  # extremes: the offset codes reach 1 and 255, the AVX2 pairs 2 * 127 * 127
    codes[1] = 127
    scale, bias = torch.rand(37, generator=gen) / 100, torch.randn(37, generator=gen)
    with kernels.use_avx512(avx512):
        got = torch.ops.leanlm.linear_int8(x, codes, scale, bias).double()  # float32 x: float32 out
    w = codes.double() * scale.double()[:, None]
    emulated = rounded_inputs(x) @ w.T + bias.double()
    tolerance = 2e-6 * (x.double().abs() @ w.abs().T).max()
    assert got.shape == (rows, 37)
    assert (got - emulated).abs().max() <= tolerance
    assert (emulated - (x.double() @ w.T + bias.double())).abs().max() > 100 * tolerance  # the rounding is visible


@pytest.mark.parametrize("avx512", PATHS)
def test_bf16_inputs_round_the_output_once_and_keep_leading_dims(avx512):
    skip_missing(avx512)
    torch.manual_seed(0)
    q = Int8Linear.from_float(torch.randn(40, 128), None, 0)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    with kernels.use_avx512(avx512):
        got = torch.ops.leanlm.linear_int8(x, q.qweight, q.scales, None)
    assert got.shape == (2, 3, 40) and got.dtype == torch.bfloat16
    w = q.dequantize().double()
    emulated = (rounded_inputs(x.reshape(6, 128)) @ w.T).reshape(2, 3, 40)
    scale = (x.reshape(6, 128).double().abs() @ w.abs().T).max()
    assert ((got.double() - emulated).abs() <= 2**-8 * emulated.abs() + 2e-6 * scale).all()


def test_the_two_paths_agree():
    if not kernels.has_avx512(vnni=True):
        pytest.skip("this CPU has no AVX512-VNNI")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 576, generator=gen)
    codes = torch.randint(-127, 128, (100, 576), generator=gen, dtype=torch.int8)
    scale = torch.rand(100, generator=gen)
    with kernels.use_avx512(False):
        avx2 = torch.ops.leanlm.linear_int8(x, codes, scale, None)
    vnni = torch.ops.leanlm.linear_int8(x, codes, scale, None)
    torch.testing.assert_close(vnni, avx2, rtol=1e-6, atol=1e-6 * float(avx2.abs().max()))


@pytest.mark.parametrize("avx512", PATHS)
def test_a_nan_input_reaches_the_outputs(avx512):
    """Rounding must not turn a NaN into a finite code: the rows it is in come out NaN, the others finite."""
    skip_missing(avx512)
    x = torch.randn(3, 96)
    x[1, 40] = float("nan")
    codes = torch.randint(-127, 128, (8, 96), dtype=torch.int8)
    with kernels.use_avx512(avx512):
        got = torch.ops.leanlm.linear_int8(x, codes, torch.ones(8), None)
        got4 = torch.ops.leanlm.linear_int4(x[:, :64], torch.randint(0, 256, (8, 32), dtype=torch.uint8),
                                            torch.ones(8, 2), torch.zeros(8, 2), 32, None)
    assert got[1].isnan().all() and got[[0, 2]].isfinite().all()
    assert got4[1].isnan().all() and got4[[0, 2]].isfinite().all()


def test_the_vnni_path_is_taken_where_the_cpu_has_it():
    """The paths add the block sums in different orders, which float32 can tell apart: with blocks worth
    127 * 2^24, 63.5, -127 * 2^24 and 0, AVX2 adds them in that order in one lane (63.5 is below half an ulp,
    64, of 127 * 2^24: lost), VNNI keeps even and odd blocks in separate lanes and adds those at the end (exact)."""
    if not kernels.has_avx512(vnni=True):
        pytest.skip("this CPU has no AVX512-VNNI")
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 32], x[0, 64] = 127 * 2.0**24, 63.5, 127 * 2.0**24  # steps 2^24, 1/2, 2^24: each rounds exactly
    codes = torch.zeros(1, 128, dtype=torch.int8)
    codes[0, 0], codes[0, 32], codes[0, 64] = 1, 1, -1
    with kernels.use_avx512(False):
        assert torch.ops.leanlm.linear_int8(x, codes, torch.ones(1), None).item() == 0
    assert torch.ops.leanlm.linear_int8(x, codes, torch.ones(1), None).item() == 63.5


def test_module_rounds_only_where_its_kernel_runs():
    torch.manual_seed(1)
    q = Int8Linear.from_float(torch.randn(48, 256) * 0.05, None, 0)
    x = torch.randn(4, 256)
    exact = x.double() @ q.dequantize().double().T
    got = q(x).double()
    steps = q.input_steps(x)
    assert steps is not None and steps.shape == (4, 256)
    assert ((got - exact).abs() <= steps.double() / 2 @ q.dequantize().double().abs().T + 1e-5).all()
    assert (got - exact).abs().max() > 1e-4  # the kernel did round
    prefill = torch.randn(40, 256)  # above the kernel's 16 rows: ATen's int8 matmul, float inputs
    assert q.input_steps(prefill) is None
    torch.testing.assert_close(q(prefill).double(), prefill.double() @ q.dequantize().double().T, rtol=1e-5, atol=1e-5)
    with kernels.use_kernels(False):
        assert q.input_steps(x) is None


def test_op_rejects_what_it_cannot_do():
    codes = torch.zeros(8, 48, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.leanlm.linear_int8(torch.randn(1, 48), codes, torch.ones(8), None)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.leanlm.linear_int8(torch.randn(1, 64), torch.zeros(8, 32, dtype=torch.int8), torch.ones(8), None)
    with pytest.raises(RuntimeError, match="row_scale"):
        torch.ops.leanlm.linear_int8(torch.randn(1, 32), torch.zeros(8, 32, dtype=torch.int8), torch.ones(7), None)
    q = Int8Linear.from_float(torch.randn(8, 48), None, 0)  # 48 inputs: the module takes ATen's kernel instead
    assert q.input_steps(torch.randn(1, 48)) is None
    torch.testing.assert_close(q(torch.ones(1, 48)), torch.ones(1, 48) @ q.dequantize().T)
