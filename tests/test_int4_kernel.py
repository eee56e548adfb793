"""leanlm::linear_int4 (engine/kernels/linear_int4.cpp): int4 codes times inputs rounded to int8 per 32.

The kernel's result is defined exactly: the dequantized weight times the inputs rounded per block of 32
(step max|x| / 127, round half to even). A float64 emulation of that must agree to float32 accumulation
error, while the emulation itself differs from the unrounded product by far more (so the check is tight).
"""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import rounded_inputs
from leanlm.engine import kernels
from leanlm.transforms.quantize.int4 import Int4Linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="leanlm's CPU kernels are not built here")


def weight_of(q: Int4Linear, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    codes = q._codes(q.qweight).double().reshape(q.out_features, -1, q.group_size) - 8
    return (codes * scales.double()[..., None] + zeros.double()[..., None]).reshape(q.out_features, q.in_features)


@pytest.mark.parametrize("out_f, in_f, group", [(83, 64, 32), (192, 576, 32), (96, 576, 64), (64, 1536, 128), (40, 512, 256)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11, 17])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_the_emulation(out_f, in_f, group, rows, scale_dtype):
    torch.manual_seed(rows + out_f)
    weight = torch.randn(out_f, in_f) * 0.05 + torch.randn(out_f, 1) * 0.02  # per-row offsets: zero points matter
    q = Int4Linear.from_float(weight, None, group)
    scales, zeros = q.scales.to(scale_dtype), q.zeros.to(scale_dtype)
    x = torch.randn(rows, in_f) * torch.rand(1, in_f) * 3  # channels of different sizes
    x[0, :32] = 0  # an all-zero block: step 0
    bias = torch.randn(out_f)
    got = torch.ops.leanlm.linear_int4(x, q.qweight, scales, zeros, group, bias).double()
    w = weight_of(q, scales, zeros)
    emulated = rounded_inputs(x) @ w.T + bias.double()
    scale = (x.double().abs() @ w.abs().T).max()
    assert (got - emulated).abs().max() <= 2e-6 * scale, ((got - emulated).abs().max(), scale)
    exact = x.double() @ w.T + bias.double()
    assert (emulated - exact).abs().max() > 100 * 2e-6 * scale  # the rounding of x is visible at this tolerance


def test_bf16_inputs_round_the_output_once():
    torch.manual_seed(0)
    q = Int4Linear.from_float(torch.randn(64, 128) * 0.05, None, 32)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)  # leading dims kept
    got = torch.ops.leanlm.linear_int4(x, q.qweight, q.scales, q.zeros, 32, None)
    assert got.shape == (2, 3, 64) and got.dtype == torch.bfloat16
    w = weight_of(q, q.scales, q.zeros)
    emulated = (rounded_inputs(x.reshape(6, 128)) @ w.T).reshape(2, 3, 64)
    scale = (x.reshape(6, 128).double().abs() @ w.abs().T).max()
    # one rounding to bf16 (at most half a unit in the last place, 2^-8 relative) after float32 accumulation
    assert ((got.double() - emulated).abs() <= 2**-8 * emulated.abs() + 2e-6 * scale).all()


def test_module_uses_the_kernel_and_its_input_steps_bound_the_error():
    torch.manual_seed(1)
    weight = torch.randn(48, 256) * 0.05
    q = Int4Linear.from_float(weight, None, 64, input_scale=torch.rand(256) + 0.5)  # AWQ-style input scale
    x = torch.randn(4, 256)
    got = q(x).double()
    exact = x.double() @ q.dequantize().double().T
    with kernels.use_kernels(False):
        assert q.input_steps(x) is None
        torch.testing.assert_close(q(x).double(), exact, rtol=1e-5, atol=1e-5)  # no rounding of x without the kernel
    # the kernel rounds x * input_scale; in x's units each input moves by at most step / 2 / input_scale
    moved = q.input_steps(x).double() / 2 / q.input_scale.double()
    bound = moved @ q.dequantize().double().abs().T + 1e-5
    assert ((got - exact).abs() <= bound).all()
    assert (got - exact).abs().max() > 1e-4  # and the kernel did round


def test_op_rejects_what_it_cannot_do():
    q = Int4Linear.from_float(torch.randn(16, 96), None, 32)  # 96 inputs: not a multiple of 64
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.leanlm.linear_int4(torch.randn(1, 96), q.qweight, q.scales, q.zeros, 32, None)
    assert q.input_steps(torch.randn(1, 96)) is None  # the module takes the dequantizing path instead
    q = Int4Linear.from_float(torch.randn(16, 64), None, 32)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.leanlm.linear_int4(torch.randn(1, 32), q.qweight, q.scales, q.zeros, 32, None)
    q = Int4Linear.from_float(torch.randn(16, 192), None, 64)
    for group in (96, 0):  # a step spans 64 inputs: groups of 32 or of a multiple of 64 only
        scales = torch.ones(16, 2) if group == 96 else q.scales
        with pytest.raises(RuntimeError, match="group size"):
            torch.ops.leanlm.linear_int4(torch.randn(1, 192), q.qweight, scales, scales, group, None)
