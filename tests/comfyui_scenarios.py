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
    model, _, _ = load("lens_turbo-q8_0.gguf")
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


def conditioning_is_native_layout(work):
    """Keys and dtypes as native Lens's encoder writes them, so native samplers take the pack's conditioning."""
    _, encoder, _ = load()
    positive, negative = encode(encoder, negative="")
    tensor, extras = positive[0]
    empty, empty_extras = negative[0]
    return {"entries": [len(positive), len(negative)], "shape": list(tensor.shape), "dtype": str(tensor.dtype),
            "keys": sorted(extras), "mask": [str(extras["attention_mask"].dtype), list(extras["attention_mask"].shape),
                                             bool(extras["attention_mask"].all())],
            "layers": extras["num_layers_stacked"], "pooled": extras["pooled_output"],
            "empty": [list(empty.shape), list(empty_extras["attention_mask"].shape), str(empty_extras["attention_mask"].dtype)]}


def native_conditioning_and_latents_give_the_same_image(work):
    """The reference's empty prompt however a graph spells it (zero tokens, all padding, ConditioningZeroOut), a bool
    mask or extra keys, and ComfyUI's Empty Latent Image in place of the pack's."""
    model, encoder, _ = load()
    positive, empty = encode(encoder, negative="")
    features, extras = positive[0]

    def sampled(pos, neg, latent=None, seed=3):
        return PACK["LensPackSampler"]().run(model, pos, neg, latent or empty_latent(), seed, 2, 5.0, 1.0)[0]["samples"]

    def empty_latent():
        return {"samples": torch.zeros(1, 128, 3, 4)}

    baseline = sampled(positive, empty)
    padded_empty = [[torch.zeros_like(features), {"attention_mask": torch.zeros(features.shape[:2], dtype=torch.int64)}]]
    (zeroed_out,) = comfy_nodes.ConditioningZeroOut().zero_out(positive)
    bool_mask = [[features, {"attention_mask": extras["attention_mask"].bool(), "some_other_key": 1}]]
    (native_latent,) = comfy_nodes.EmptyLatentImage().generate(64, 48, 1)
    return {"padded_empty": diff(sampled(positive, padded_empty), baseline), "zeroed_out": diff(sampled(positive, zeroed_out), baseline),
            "bool_mask": diff(sampled(bool_mask, empty), baseline), "native_latent": diff(sampled(positive, empty, native_latent), baseline),
            "other_seed": diff(sampled(positive, empty, seed=4), baseline)}


def bad_inputs_are_refused_with_messages_before_the_model_loads(work):
    model, encoder, vae = load()
    positive, negative = encode(encoder, negative="")
    loads = []
    real_load = mm.load_models_gpu
    mm.load_models_gpu = lambda *a, **k: loads.append(1) or real_load(*a, **k)
    sampler, latent = PACK["LensPackSampler"](), {"samples": torch.zeros(1, 128, 2, 2)}
    nan = [[torch.full_like(positive[0][0], float("nan")), positive[0][1]]]
    concatenated = [[torch.cat([positive[0][0]] * 2, dim=1), positive[0][1]]]
    cases = {
        "combined": lambda: sampler.run(model, positive + positive, negative, latent, 0, 2, 5.0, 1.0),
        "concatenated": lambda: sampler.run(model, concatenated, negative, latent, 0, 2, 5.0, 1.0),
        "sd_latent": lambda: sampler.run(model, positive, negative, {"samples": torch.ones(1, 4, 6, 8)}, 0, 2, 5.0, 1.0),
        "clip": lambda: sampler.run(model, [[torch.zeros(1, 77, 768), {}]], negative, latent, 0, 2, 5.0, 1.0),
        "nan_conditioning": lambda: sampler.run(model, nan, negative, latent, 0, 2, 5.0, 1.0),
        "negative_cfg": lambda: sampler.run(model, positive, negative, latent, 0, 2, -1.0, 1.0),
        "nan_latent": lambda: sampler.run(model, positive, negative, {"samples": torch.full((1, 128, 2, 2), float("nan"))}, 0, 2, 5.0, 1.0),
        "empty_latent": lambda: PACK["LensPackVAEDecode"]().decode(vae, {"samples": torch.zeros(1, 128, 0, 0)}),
        "nan_image": lambda: PACK["LensPackVAEEncode"]().encode(vae, torch.full((1, 32, 32, 3), float("nan"))),
        "not_lens": lambda: PACK["LensPackTurboSampler"]().run(_sd_like(model), positive, latent, 0, 1),
        "vae_in_dit_slot": lambda: PACK["LensPackModelLoader"]().load(_vae_in_the_denoiser_folder(), ENCODER, VAE, "auto", "fp32", False),
    }
    messages = {}
    for name, case in cases.items():
        try:
            case()
            messages[name] = None
        except Exception as e:  # noqa: BLE001 - every case must end in a message
            messages[name] = f"{type(e).__name__}: {e}"
    mm.load_models_gpu = real_load
    return {"messages": messages, "loads": len(loads)}


def _vae_in_the_denoiser_folder() -> str:
    """The VAE file put in models/diffusion_models by mistake; its name there."""
    import folder_paths

    vae = Path(folder_paths.get_full_path("vae", VAE))
    mistake = Path(folder_paths.get_folder_paths("diffusion_models")[0]) / "flux2-vae-by-mistake.safetensors"
    if not mistake.exists():
        mistake.symlink_to(vae)
    return mistake.name


def _sd_like(model):
    """A MODEL whose latent format is SD's (4 channels): what a user may wire into a Lens sampler by mistake."""
    import comfy.latent_formats

    other = model.clone()
    other.add_object_patch("latent_format", comfy.latent_formats.SD15())
    other.model = type("Other", (), {"latent_format": comfy.latent_formats.SD15(), "diffusion_model": None})()
    return other


def progress_is_reported_every_step_and_cancel_stops_sampling(work):
    """ComfyUI's progress bar gets every step (with a preview where previews are on); its interrupt stops the run."""
    import comfy.utils

    model, encoder, _ = load()
    positive, _ = encode(encoder)
    seen = []
    real_update = comfy.utils.ProgressBar.update_absolute

    def recording(bar, value, total=None, preview=None):
        seen.append((value, total))
        return real_update(bar, value, total, preview)

    def hook(value, total, preview, node_id=None):
        mm.throw_exception_if_processing_interrupted()  # as ComfyUI's server hook does

    comfy.utils.set_progress_bar_global_hook(hook)
    comfy.utils.ProgressBar.update_absolute = recording  # what the sampler reports (recent ComfyUI throttles the hook)
    try:
        turbo(model, positive, steps=4)
        steps = list(seen)
        seen.clear()
        calls = []
        real_apply = model.model._apply_model

        def counting(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                mm.interrupt_current_processing(True)  # the user presses Cancel during step 2
            return real_apply(*args, **kwargs)

        model.model._apply_model = counting
        try:
            turbo(model, positive, steps=4)
            cancelled = False
        except mm.InterruptProcessingException:
            cancelled = True
        finally:
            del model.model._apply_model
            mm.interrupt_current_processing(False)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.utils.ProgressBar.update_absolute = real_update
    return {"steps": steps, "cancelled": cancelled, "model_calls": len(calls)}


def a_cached_prompt_does_not_load_the_encoder(work):
    _, encoder, _ = load()
    loads = []
    real_load = mm.load_models_gpu

    def recording(models, *args, **kwargs):
        loads.extend(type(m.model).__name__ for m in models)
        return real_load(models, *args, **kwargs)

    mm.load_models_gpu = recording
    try:
        first = encode(encoder, "a lighthouse in fog", "blurry")
        after_first = list(loads)
        second = encode(encoder, "a lighthouse in fog", "blurry")
        after_second = list(loads)
    finally:
        mm.load_models_gpu = real_load
    return {"after_first": after_first, "after_second": after_second,
            "same": diff(first[0][0][0], second[0][0][0]) + diff(first[1][0][0], second[1][0][0])}


def the_loader_follows_file_content_and_logs_what_it_loaded(work):
    """A fine-tune of the same size copied with its old modification time (cp -p, rsync -a, tar) is a new model;
    touching a file is not. One log line per model."""
    import logging
    import os

    import folder_paths
    from safetensors.torch import load_file, save_file

    loader = PACK["LensPackModelLoader"]
    names = ("lens_bf16.safetensors", ENCODER, VAE)
    before = loader.IS_CHANGED(*names, variant="auto")
    vae_file = Path(folder_paths.get_full_path("vae", VAE))
    original = vae_file.read_bytes()
    stat = vae_file.stat()
    os.utime(vae_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = loader.IS_CHANGED(*names, variant="auto")
    tuned = {k: v.clone() for k, v in load_file(str(vae_file)).items()}
    tuned["decoder.conv_out.bias"] += 0.5
    try:
        save_file(tuned, str(vae_file))
        os.utime(vae_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        changed = loader.IS_CHANGED(*names, variant="auto")
        same_size = vae_file.stat().st_size == stat.st_size
    finally:
        vae_file.write_bytes(original)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("lens_core").addHandler(handler)
    logging.getLogger("lens_core").setLevel(logging.INFO)
    try:
        load("lens_turbo_bf16.safetensors", variant="turbo", weight_dtype="auto")
    finally:
        logging.getLogger("lens_core").removeHandler(handler)
    return {"touched_same": touched == before, "tuned_differs": changed != before, "same_size": same_size,
            "missing": loader.IS_CHANGED("gone.safetensors", ENCODER, VAE), "log": [line for line in lines if line.startswith("Lens Model Loader:")]}


def lora_loader_chains_and_strength_zero_is_identity(work):
    model, encoder, _ = load()
    positive, _ = encode(encoder)
    lora = PACK["LensPackLoraLoader"]()
    base = turbo(model, positive)
    (off,) = lora.apply(model, LORA, 0.0)
    (once,) = lora.apply(model, LORA, 0.5)
    (twice,) = lora.apply(once, LORA, 0.5)
    (full,) = lora.apply(model, LORA, 1.0)
    return {"off_is_model": off is model, "once_changes": diff(turbo(once, positive), base),
            "twice_is_full": diff(turbo(twice, positive), turbo(full, positive)), "base_unchanged": diff(turbo(model, positive), base)}


def concurrent_loads_of_one_file_load_it_once(work):
    import threading
    import time

    import folder_paths

    loader_module = __import__(type(PACK["LensPackModelLoader"]()).__module__, fromlist=["x"])
    loader_module._cache.clear()
    calls, results = [], []

    def slow_load():
        calls.append(1)
        time.sleep(0.2)
        return object()

    path = folder_paths.get_full_path("vae", VAE)
    threads = [threading.Thread(target=lambda: results.append(loader_module._load_once("vae", path, None, slow_load))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loader_module._cache.clear()
    return {"loads": len(calls), "distinct": len({id(r) for r in results})}


def the_loader_works_where_comfyui_makes_linear_weights_lazily(work):
    """On Windows with dynamic VRAM, ComfyUI's Linear layers are built without weights (they come with the state dict);
    the pack fills its own: it must still get every weight. (Simulated here: the switches ComfyUI reads.)"""
    import comfy.ops

    if not hasattr(comfy.ops, "enables_dynamic_vram"):
        return {"skipped": "this ComfyUI has no lazily built Linear layers"}
    windows, dynamic = mm.WINDOWS, comfy.ops.enables_dynamic_vram
    mm.WINDOWS, comfy.ops.enables_dynamic_vram = True, lambda: True
    try:
        model, encoder, vae = load("lens_turbo_bf16.safetensors", variant="turbo", weight_dtype="fp32")
    finally:
        mm.WINDOWS, comfy.ops.enables_dynamic_vram = windows, dynamic
    positive, _ = encode(encoder)
    out = turbo(model, positive)
    reference_model, _, _ = load("lens_turbo_bf16.safetensors")
    return {"same": diff(out, turbo(reference_model, positive))}


def warnings_reach_the_page_and_the_pack_names_its_version(work):
    """Warnings that change the result go to the client that queued the prompt, through ComfyUI's server (a stand-in
    here: the real one needs aiohttp; its send_sync's parameters are read from the real server.py). The load line
    names the pack's version."""
    import ast
    import sys
    import types

    import __main__

    sent = []

    class Server:
        client_id = "client-1"

        def send_sync(self, event, data, sid=None):
            sent.append([event, data["message"], sid])

    stand_in = types.ModuleType("server")
    stand_in.PromptServer = type("PromptServer", (), {"instance": Server()})
    real = sys.modules.get("server")
    sys.modules["server"] = stand_in
    try:
        PACK["LensPackEmptyLatent"]().generate(1024, "custom", 1000, 2200, 1)
        model, encoder, _ = load()
        positive, negative = encode(encoder)
        PACK["LensPackSampler"]().run(model, positive, negative, empty(), 7, 2, 5.0, 1.0)
    finally:
        sys.modules.pop("server")
        if real is not None:
            sys.modules["server"] = real
    source = (Path(mm.__file__).parents[1] / "server.py").read_text(encoding="utf-8")
    send_sync = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef) and node.name == "send_sync")
    return {"sent": sent, "real_send_sync": [arg.arg for arg in send_sync.args.args],
            "load_log": [line for line in __main__.LOAD_LOG if line.startswith("Lens node pack")]}
