"""Tiny random Lens models written to disk in the real published formats, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import comfy_kitchen
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from lens_core.dit.model import DiTConfig, LensDiT
from lens_core.quant.gguf_blocks import FLOAT_TYPES, TYPES

MXFP8_FORMAT = "mxfp8"

TINY_DIT = DiTConfig(hidden=128, heads=2, blocks=2, mlp_hidden=341, text_width=48, text_layers=4)


def comfy_quant_tensor(fmt: str) -> torch.Tensor:
    """The `{name}.comfy_quant` marker tensor of Comfy-Org's quantised files: the JSON `{"format": fmt}` as uint8 bytes."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def quantize_linear_mxfp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three tensors an mxfp8 file stores for one Linear weight [out, in] (scales as uint8)."""
    qweight, scales = comfy_kitchen.quantize_mxfp8(weight.float().contiguous())
    return {"weight": qweight, "weight_scale": scales.view(torch.uint8), "comfy_quant": comfy_quant_tensor(MXFP8_FORMAT)}


def random_dit_state(cfg: DiTConfig = TINY_DIT, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LensDiT(cfg)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn_like(tensor)
        if "norm" in name:
            state[name] = 1.0 + 0.1 * noise
        elif tensor.ndim == 1:
            state[name] = 0.1 * noise
        else:
            state[name] = noise / tensor.shape[1] ** 0.5
    return state


def write_single(state, path: Path, dtype=torch.bfloat16, prefix: str = "", metadata=None) -> Path:
    save_file({prefix + k: v.to(dtype).contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def write_diffusers_shards(state, folder: Path, n_shards: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k].float().contiguous() for k in keys[i::n_shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hidden = state["img_in.weight"].shape[0]
    blocks = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    (folder / "config.json").write_text(json.dumps({"num_layers": blocks, "num_attention_heads": hidden // 64, "attention_head_dim": 64,
                                                   "enc_hidden_dim": state["txt_norm.0.weight"].shape[0]}))
    return folder


def mxfp8_state(state) -> dict[str, torch.Tensor]:
    """Quantise every block Linear whose input width is a multiple of 32, as Comfy-Org's files do."""
    out = {}
    for name, tensor in state.items():
        module = name[: -len(".weight")]
        if name.startswith("transformer_blocks.") and name.endswith(".weight") and tensor.ndim == 2 and tensor.shape[1] % 32 == 0:
            for suffix, value in quantize_linear_mxfp8(tensor).items():
                out[f"{module}.{suffix}"] = value
        else:
            out[name] = tensor.to(torch.bfloat16)
    return out


def dequantised(state_mx) -> dict[str, torch.Tensor]:
    """The float state an mxfp8 state stands for (comfy-kitchen's dequantiser)."""
    import comfy_kitchen

    out = {}
    for name, tensor in state_mx.items():
        if name.endswith((".weight_scale", ".comfy_quant")):
            continue
        scale_key = name[: -len("weight")] + "weight_scale"
        if scale_key in state_mx:
            tensor = comfy_kitchen.dequantize_mxfp8(tensor, state_mx[scale_key].view(torch.float8_e8m0fnu), output_type=torch.float32)
        out[name] = tensor.float()
    return out


QUANTISED_TYPES = sorted(TYPES)


def random_blocks(qtype: int, rows: int, values_per_row: int, rng, scale: float = 0.02):
    """Random raw bytes (numpy uint8) of a [rows, values_per_row] tensor of ggml type `qtype`, scales up to `scale`
    (the float16 scale fields must be finite; the rest of a block may be any bytes)."""
    import numpy as np

    block, size = TYPES[qtype].values, TYPES[qtype].nbytes
    raw = rng.integers(0, 256, (rows, values_per_row // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for offset in TYPES[qtype].scale_bytes:
        blocks[:, offset:offset + 2] = rng.uniform(-scale, scale, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    if qtype == 39:  # MXFP4: an E8M0 scale byte near 2^log2(scale)
        blocks[:, 0] = rng.integers(-2, 1, blocks.shape[0]) + 127 + int(np.floor(np.log2(scale)))
    return raw


# tests/converted/lens_tiny_sd_cpp_mixed.gguf: this random denoiser (seed 5), written in bf16 and converted by
# stable-diffusion.cpp (`sd-cli -M convert --diffusion-model SRC -o OUT --type q8_0 --tensor-type-rules RULES`). The
# rules spread every type the pack decodes over its tensors (first matching pattern wins; sd.cpp keeps img_in, txt_in
# and the biases in the source's bf16). Hidden size 256: the K types need rows of 256 values.
SD_CPP_DIT = DiTConfig(hidden=256, heads=2, blocks=1, mlp_hidden=256, text_width=64, text_layers=4)
SD_CPP_SEED = 5
SD_CPP_RULES = (r"img_qkv=q8_0,txt_qkv=q4_K,img_mod=q2_K,txt_mod=q3_K,to_out=q5_K,to_add_out=q6_K,img_mlp\.w1=iq4_xs,"
                r"img_mlp\.w2=iq4_nl,img_mlp\.w3=q4_0,txt_mlp\.w1=q4_1,txt_mlp\.w2=q5_0,txt_mlp\.w3=q5_1,proj_out=mxfp4,"
                r"linear_1=f16,norm_out=q4_K,_norm\d=q4_K,txt_norm\.=q8_0,attn\.norm=f32")
SD_CPP_FILE = Path(__file__).resolve().parent / "converted" / "lens_tiny_sd_cpp_mixed.gguf"


def dequantised_by_gguf(path, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as the `gguf` package dequantises it (float32), under its name less `prefix`."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    return {t.name.removeprefix(prefix): torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            for t in reader.tensors}


def dit_inputs(text_width: int):
    """Fixed denoiser inputs: latent tokens of a 3x4 grid, two timesteps, two prompts (the second padded)."""
    torch.manual_seed(3)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return (torch.randn(2, 12, 128), torch.tensor([0.9, 0.4]), torch.randn(2, 5, 4, text_width) * mask[..., None, None], mask, (3, 4))


def finish_gguf(writer) -> None:
    """Write out and close a gguf.GGUFWriter (header, metadata, tensors)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(path, state: dict[str, torch.Tensor], qtype: int, rng, architecture: str = "lens") -> dict[str, torch.Tensor]:
    """`state` as a GGUF file with its state-dict names (as ComfyUI-GGUF's converter keeps them): 2-D weights whose rows
    hold whole blocks become `qtype` blocks (quantised by gguf where it can, else random), the rest float32. Returns the state as the `gguf` package
    dequantises it (the reference)."""
    import gguf
    from gguf.quants import dequantize

    writer = gguf.GGUFWriter(str(path), architecture)
    reference = {}
    for name, tensor in state.items():
        block = 1 if qtype in FLOAT_TYPES else TYPES[qtype].values
        if tensor.ndim == 2 and name.endswith(".weight") and tensor.shape[1] % block == 0:
            try:  # what ComfyUI-GGUF's converter calls (gguf quantises Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 in numpy)
                raw = gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType(qtype))
            except NotImplementedError:  # the K and IQ types need llama.cpp's C++ quantiser: random blocks instead
                raw = random_blocks(qtype, tensor.shape[0], tensor.shape[1], rng, scale=2e-4)  # weights of a usable size
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(qtype))
            reference[name] = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType(qtype)).copy())
        else:
            values = tensor.float().numpy()
            writer.add_tensor(name, values)
            reference[name] = torch.from_numpy(values.copy())
    finish_gguf(writer)
    return reference


class Float32Outputs(TorchDispatchMode):
    """Records the size of every float32 tensor an operation makes (a decode into bf16 must make none of a weight's
    size)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.sizes.append(t.numel())
        return out
