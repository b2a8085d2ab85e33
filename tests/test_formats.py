"""The packed formats other than GGUF's (lens_core/quant/formats.py) decode straight into the compute dtype, and agree
with their float32 decode."""

import pytest
import torch
from model_files import Float32Outputs

from lens_core.quant import formats

ROWS, COLS = 64, 128


def random_parts(fmt) -> dict[str, torch.Tensor]:
    """Valid random parts: codes of any value (fp8 codes that are not NaN), scales in a moderate range."""
    generator = torch.Generator().manual_seed(0)
    parts = {}
    for name, (shape, storage) in fmt.shapes(ROWS, COLS).items():
        if name == "weight" and fmt in (formats.MXFP8_COMFY, formats.FP8_ROWS[False]):
            values = torch.randn(shape, generator=generator).to(torch.float8_e4m3fn)
            parts[name] = values.view(storage)
        elif name == "weight":
            parts[name] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).view(storage)
        elif fmt is formats.NVFP4_COMFY and name == "weight_scale":
            parts[name] = (torch.rand(shape, generator=generator) + 0.5).to(torch.float8_e4m3fn).view(storage)
        elif storage == torch.uint8:  # E8M0 scales around 2^0
            parts[name] = torch.randint(124, 130, shape, dtype=torch.uint8, generator=generator)
        else:  # float32 scales stored as int32 bits
            parts[name] = (torch.rand(shape, generator=generator) + 0.5).view(storage)
    return parts


@pytest.mark.parametrize("fmt", [formats.MXFP4_HF, formats.NVFP4_COMFY, formats.MXFP8_COMFY, formats.FP8_ROWS[False]],
                         ids=lambda f: f.name)
def test_decoding_to_bf16_makes_no_float32_copy_of_the_weight(fmt):
    parts = random_parts(fmt)
    exact = fmt.decode(parts, ROWS, COLS, torch.float32)
    with Float32Outputs() as recorded:
        bf16 = fmt.decode(parts, ROWS, COLS, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (ROWS, COLS)
    assert max(recorded.sizes, default=0) <= ROWS * COLS // 16  # per-block or per-row scales at most
    assert torch.isfinite(exact).all() and fmt.finite(parts)
    assert ((bf16.float() - exact).abs() <= 3 * 2 ** -8 * exact.abs().amax(dim=-1, keepdim=True)).all()
