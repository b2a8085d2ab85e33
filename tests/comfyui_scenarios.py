"""Scenarios run inside a real ComfyUI by tests/comfyui_child.py (never imported by pytest itself): each takes the work
folder and returns JSON-able numbers that tests/test_comfyui.py checks. The models folder holds tiny models in the
real formats (tests/conftest.py's models_dir)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import torch
from workflow_runner import run_workflow

import nodes as comfy_nodes

PACK = comfy_nodes.NODE_CLASS_MAPPINGS
VAE = "flux2-vae.safetensors"
ENCODER = "gpt_oss_20b_nvfp4.safetensors"
LORA = "lens_turbo_style_lora.safetensors"
GGUF_LORA = "lens_gguf_lora.safetensors"  # for stable-diffusion.cpp's file


def load(dit="lens_turbo_bf16.safetensors", variant="auto", weight_dtype="fp32", encoder=ENCODER):
    return PACK["LensPackModelLoader"]().load(dit, encoder, VAE, variant, weight_dtype, False)


def encode(encoder, positive="a red fox in snow", negative="blurry"):
    return PACK["LensPackTextEncode"]().encode(encoder, positive, negative)


def empty(h=3, w=4, batch=1) -> dict:
    return {"samples": torch.zeros(batch, 128, h, w)}


def turbo(model, positive, latent=None, seed=7, steps=2) -> torch.Tensor:
    return PACK["LensPackTurboSampler"]().run(model, positive, latent or empty(), seed, steps)[0]["samples"]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def ksampler_and_custom_sampling_match_the_pack_samplers(work):
    """KSampler's sampling function and SamplerCustomAdvanced's pieces (a guider, ComfyUI's euler) at the Lens
    Scheduler's sigmas give the pack samplers' result, at CFG 1 (Turbo) and CFG 5 (norm-rescaled)."""
    model, encoder, _ = load()
    positive, negative = encode(encoder)
    latent = empty()
    noise = comfy.sample.prepare_noise(latent["samples"], 7)
    sigmas = PACK["LensPackScheduler"]().get_sigmas(2, 64, 48, "turbo", 1.0)[0]
    ours = turbo(model, positive)
    ksampler = comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", positive, negative, latent["samples"], sigmas=sigmas)
    ours_cfg = PACK["LensPackSampler"]().run(model, positive, negative, latent, 7, 2, 5.0, 1.0)[0]["samples"]
    guider = PACK["LensPackCFGGuider"]().get_guider(model, positive, negative, 5.0)[0]
    custom = guider.sample(noise, latent["samples"], comfy.samplers.sampler_object("euler"), sigmas, seed=7)
    plain_cfg = comfy.sample.sample(model, noise, 2, 5.0, "euler", "simple", positive, negative, latent["samples"], sigmas=sigmas)
    return {"ksampler": diff(ours, ksampler), "custom": diff(ours_cfg, custom), "plain_cfg_differs": diff(ours_cfg, plain_cfg),
            "std": float(ours.std())}


def the_patcher_is_the_one_comfyui_uses(work):
    model, _, _ = load()
    bound = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)

    class Rebound(bound):  # as dynamic VRAM rebinds it
        pass

    comfy.model_patcher.CoreModelPatcher = Rebound
    try:
        rebound, _, _ = load(variant="turbo")
    finally:
        comfy.model_patcher.CoreModelPatcher = bound
    return {"default": type(model) is bound, "follows_the_binding": type(rebound) is Rebound}


def a_dropped_model_is_collected_after_comfyui_unloads_it(work):
    model, encoder, _ = load("lens_bf16.safetensors", variant="turbo")
    positive, _ = encode(encoder)
    turbo(model, positive)
    refs = {"patcher": weakref.ref(model), "model": weakref.ref(model.model), "dit": weakref.ref(model.model.diffusion_model)}
    del model
    other, _, _ = load("lens_turbo_bf16.safetensors")
    turbo(other, positive)
    mm.unload_all_models()
    gc.collect()
    loaded_before = len(mm.current_loaded_models)
    return {"alive": sorted(name for name, ref in refs.items() if ref() is not None), "loaded": loaded_before}


def lora_patches_load_and_unload_with_the_model(work):
    model, encoder, _ = load()
    positive, _ = encode(encoder)
    base = turbo(model, positive)
    (ours,) = PACK["LensPackLoraLoader"]().apply(model, LORA, 0.8)
    with_lora = turbo(ours, positive)
    base_again = turbo(model, positive)
    (native,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA, 0.8)
    with_native_lora = turbo(native, positive)
    return {"lora_changes": diff(with_lora, base), "base_back": diff(base_again, base), "native_equal": diff(with_native_lora, with_lora)}


def _forward(model, seed=0):
    """One denoiser call through ComfyUI's BaseModel (as its samplers call it)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 128, 3, 4, generator=generator)
    context = torch.randn(1, 5, model.model.diffusion_model.txt_in.in_features, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return model.model.apply_model(x, torch.tensor([0.7]), c_crossattn=context, attention_mask=mask)


def a_partial_load_computes_what_a_full_load_computes(work):
    """Packed layers (the GGUF file stable-diffusion.cpp made) and plain ones, with a LoRA: loaded whole, then with a
    memory budget far below the model (most layers cast on use, the LoRA applied after decoding)."""
    model, _, _ = load("lens_turbo-Q8_0.gguf")
    base = _forward(model)
    (patched,) = PACK["LensPackLoraLoader"]().apply(model, GGUF_LORA, 0.8)
    device = mm.get_torch_device()
    results = {}
    for name, budget in (("full", 0), ("partial", 64 * 1024)):
        patched.patch_model(device_to=device, lowvram_model_memory=budget)
        results[name] = _forward(patched)
        results[f"{name}_cast_on_use"] = sum(1 for m in patched.model.modules() if getattr(m, "comfy_cast_weights", False))
        patched.detach()
    dense, _, _ = load("lens_turbo_dense.safetensors")
    (dense_patched,) = PACK["LensPackLoraLoader"]().apply(dense, GGUF_LORA, 0.8)
    dense_patched.patch_model(device_to=device)
    dense_out = _forward(dense_patched)
    dense_patched.detach()
    return {"partial": diff(results["full"], results["partial"]), "lora_changes": diff(results["full"], base),
            "dense": diff(results["full"], dense_out), "cast_full": results["full_cast_on_use"], "cast_partial": results["partial_cast_on_use"]}


def comfyuis_own_nodes_take_the_model(work):
    model, encoder, _ = load()
    positive, negative = encode(encoder)
    latent = empty()
    out = {}
    (ksampled,) = comfy_nodes.KSampler().sample(model, 3, 2, 1.0, "euler", "simple", positive, negative, latent)
    out["ksampler_finite"] = bool(ksampled["samples"].isfinite().all())
    calls = []

    def replace(args, extra):
        calls.append(args["transformer_options"]["block_index"])
        return extra["original_block"](args)

    patched = model.clone()
    patched.set_model_patch_replace(replace, "dit", "double_block", 0)
    out["block_replace_same"] = diff(turbo(patched, positive), turbo(model, positive))
    out["block_replace_called"] = len(calls)
    post = []

    def after_block(args):
        post.append(args["block_index"])
        return {"img": args["img"], "txt": args["txt"]}

    patched = model.clone()
    patched.set_model_double_block_patch(after_block) if hasattr(patched, "set_model_double_block_patch") else \
        patched.set_model_patch(after_block, "double_block")
    turbo(patched, positive)
    out["double_block_patches"] = len(post)
    try:
        from comfy_extras.nodes_easycache import EasyCacheNode
    except ImportError:
        return out
    cached = EasyCacheNode.execute(model, 0.2, 0.0, 1.0, False).result[0]
    result = PACK["LensPackSampler"]().run(cached, positive, negative, empty(), 3, 4, 5.0, 1.0)[0]["samples"]
    out["easycache_finite"] = bool(result.isfinite().all())
    return out


def inpainting_keeps_the_latent_outside_the_mask(work):
    model, encoder, _ = load()
    positive, negative = encode(encoder)
    torch.manual_seed(0)
    source = torch.randn(1, 128, 4, 4)
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :] = 1.0  # the top half (in pixels) is redrawn
    (latent,) = comfy_nodes.SetLatentNoiseMask().set_mask({"samples": source}, mask)
    out = PACK["LensPackSampler"]().run(model, positive, negative, latent, 5, 3, 5.0, 1.0)[0]["samples"]
    return {"outside": diff(out[:, :, 2:], source[:, :, 2:]), "inside": diff(out[:, :, :2], source[:, :, :2])}


def the_text_encoder_and_vae_are_comfyuis_models(work):
    model, encoder, vae = load()
    positive, _ = encode(encoder, positive="a new prompt, never cached")
    image = PACK["LensPackVAEDecode"]().decode(vae, {"samples": turbo(model, positive)})[0]
    models = [m.model.model for m in mm.current_loaded_models]  # the patchers' models (the pack's Holder around two of them)
    loaded = {type(getattr(m, "model", m) if type(m).__name__ == "Holder" else m).__name__ for m in models}
    mm.unload_all_models()
    return {"loaded": sorted(loaded), "after_unload": len(mm.current_loaded_models), "image": list(image.shape)}


def shipped_workflows_run(work):
    """Every shipped workflow, shrunk to a tiny size, through the pack's nodes and ComfyUI's own (Save Image, Load
    Image, Set Latent Noise Mask)."""
    from PIL import Image

    source = (torch.linspace(0, 255, 70 * 90 * 4) % 256).to(torch.uint8).reshape(70, 90, 4).numpy()
    source[..., 3] = 255
    source[:35, :, 3] = 0  # a painted mask over the top half, as the mask editor saves it
    Image.fromarray(source, "RGBA").save(work / "input" / "example.png")
    results = {}
    for path in sorted(Path(__file__).resolve().parent.parent.glob("workflows/*.json")):
        shrunk = work / path.name
        shrunk.write_text(json.dumps(shrink(json.loads(path.read_text()))))
        outputs = run_workflow(shrunk, comfy_nodes.NODE_CLASS_MAPPINGS)
        images = [o for out in outputs.values() for o in out if torch.is_tensor(o) and o.ndim == 4 and o.shape[-1] == 3]
        results[path.stem] = {"images": [list(i.shape) for i in images], "finite": all(bool(i.isfinite().all()) for i in images)}
    return results


def shrink(workflow: dict) -> dict:
    """The example at a CI-sized resolution and step count (same graph, same widgets)."""
    for node in workflow["nodes"]:
        if node["type"] == "LensPackEmptyLatent":
            node["widgets_values"] = [1024, "custom", 96, 64, 1]
        if node["type"] == "LensPackSampler":
            node["widgets_values"][2] = 2
        if node["type"] == "LensPackTurboSampler":
            node["widgets_values"][2] = 2
    return workflow
