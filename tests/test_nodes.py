"""The ComfyUI node pack without ComfyUI: definitions, conditioning format, errors, and the example
workflows executed end to end on tiny random weight files in a temporary models folder."""

import json
import logging
from pathlib import Path

import pytest
import torch
from pack import ROOT, import_pack
from workflow_runner import NativeNodes, run_workflow, widget_names

pack = import_pack()
NODES = pack.NODE_CLASS_MAPPINGS
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
GGUF_ENCODER_REPO = "https://huggingface.co/ggml-org/gpt-oss-20b-GGUF"  # llama.cpp's own GPT-OSS-20B GGUF


def test_every_node_is_documented():
    assert set(NODES) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in NODES.items():
        assert node_id.startswith("LensPack")
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("Lens")
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        for section in cls.INPUT_TYPES().values():
            for name, (_, *options) in section.items():
                assert options and options[0].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_loader_tooltips_say_where_files_go():
    tips = {k: v[1]["tooltip"] for k, v in NODES["LensPackModelLoader"].INPUT_TYPES()["required"].items() if k.endswith("_name")}
    assert "models/diffusion_models" in tips["dit_name"] and "models/text_encoders" in tips["text_encoder_name"]
    assert "models/vae" in tips["vae_name"] and all("https://huggingface.co/Comfy-Org/Lens/resolve/main/" in t for t in tips.values())


def test_every_download_link_has_the_comfy_org_layout():
    """Comfy-Org/Lens keeps its files at resolve/main/<folder>/<file> (no split_files/)."""
    import re

    pattern = re.compile(r"https://huggingface\.co/Comfy-Org/Lens/[^\s\"')]*")
    loader = NODES["LensPackModelLoader"]
    tooltips = [options["tooltip"] for _, (_, options) in loader.INPUT_TYPES()["required"].items()]
    texts = [p.read_text() for p in [ROOT / "README.md", *WORKFLOWS]] + tooltips + [loader.DESCRIPTION]
    links = [link for text in texts for link in pattern.findall(text)]
    assert links and not any("split_files" in link for link in links)
    for link in links:
        pattern = r"https://huggingface\.co/Comfy-Org/Lens(/resolve/main/(diffusion_models|text_encoders|vae)/[\w.-]+\.safetensors)?"
        assert re.fullmatch(pattern, link), link


def image_source():
    torch.manual_seed(0)
    return torch.rand(1, 70, 90, 3)  # not a multiple of 16: centre-cropped to 64 x 80


def shrink(workflow_path: Path, tmp_path: Path, seed: int) -> Path:
    """The example at a CI-sized resolution and step count, with a chosen seed (same graph, same widgets)."""
    workflow = json.loads(workflow_path.read_text())
    for node in workflow["nodes"]:
        if node["type"] == "LensPackEmptyLatent":
            node["widgets_values"] = [1024, "custom", 96, 64, 2]
        if node["type"] == "LensPackSampler":
            node["widgets_values"][0], node["widgets_values"][2] = seed, 3
        if node["type"] == "LensPackTurboSampler":
            node["widgets_values"][0] = seed
    out = tmp_path / f"{workflow_path.stem}_{seed}.json"
    out.write_text(json.dumps(workflow))
    return out


def test_three_example_workflows_exist():
    assert {p.stem for p in WORKFLOWS} == {"lens_text_to_image", "lens_turbo_text_to_image", "lens_img2img", "lens_lora",
                                           "lens_turbo_gguf"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_definitions(workflow):
    data = json.loads(workflow.read_text())
    ids = {n["id"] for n in data["nodes"]}
    for node in data["nodes"]:
        if node["type"] in NODES:
            cls = NODES[node["type"]]
            names = widget_names(cls)
            expected = sum(2 if o.get("control_after_generate") else 1 for _, o in names)
            assert len(node["widgets_values"]) == expected, node["type"]
            inputs = [n for section in cls.INPUT_TYPES().values() for n, (t, *_) in section.items()
                      if not (isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN"))]
            assert [i["name"] for i in node["inputs"]] == inputs
            assert [o["type"] for o in node["outputs"]] == list(cls.RETURN_TYPES)
            for name, _ in names:
                spec = dict((k, v) for s in cls.INPUT_TYPES().values() for k, v in s.items())[name]
                if isinstance(spec[0], list) and node["type"] not in ("LensPackModelLoader", "LensPackLoraLoader"):  # file lists
                    assert node["widgets_values"][[n for n, _ in names].index(name)] in spec[0], name
        else:
            assert node["type"] in ("SaveImage", "LoadImage", "Note")
    for _, src, _, dst, _, _ in data["links"]:
        assert src in ids and dst in ids
    loaders = [n for n in data["nodes"] if n["type"] == "LensPackModelLoader"]
    models = loaders[0]["properties"]["models"] if loaders else []
    assert models and all(m["url"] in (f"https://huggingface.co/Comfy-Org/Lens/resolve/main/{m['directory']}/{m['name']}",
                                       f"{GGUF_ENCODER_REPO}/resolve/main/{m['name']}") for m in models)
    assert data["groups"] and any(n["type"] == "Note" for n in data["nodes"])


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_note_lists_its_model_files(workflow):
    """Each note says which file goes in which models folder, and where the placeholders come from."""
    nodes = json.loads(workflow.read_text())["nodes"]
    note = "\n".join(n["widgets_values"][0] for n in nodes if n["type"] == "Note")
    models = [m for n in nodes if n["type"] == "LensPackModelLoader" for m in n["properties"]["models"]]
    for model in models:
        assert f"{model['directory']}/{model['name']}" in note
    assert "https://huggingface.co/Comfy-Org/Lens" in note
    for node in nodes:
        if node["type"] == "LoadImage":
            assert node["widgets_values"][0] == "example.png" and "ships with ComfyUI" in note
        if node["type"] == "LensPackLoraLoader":
            assert f"{node['widgets_values'][0]} is a placeholder" in note and "ComfyUI/models/loras" in note
        if node["type"] == "LensPackModelLoader" and node["widgets_values"][0].endswith(".gguf"):  # no single published file
            assert f"diffusion_models/{node['widgets_values'][0]} is a placeholder" in note
        if any(m["url"].startswith(GGUF_ENCODER_REPO) for m in models):
            assert GGUF_ENCODER_REPO in note


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_end_to_end(workflow, models_dir, tmp_path):
    runs = []
    for seed in (5, 5, 6):
        natives = NativeNodes(image_source)
        run_workflow(shrink(workflow, tmp_path, seed), NODES, natives)
        (images,) = natives.saved
        runs.append(images)
    images = runs[0]
    expected = (1, 64, 80, 3) if "img2img" in workflow.stem else (2, 64, 96, 3)
    assert images.shape == expected and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_conditioning_is_native_layout(models_dir):
    """Keys and dtypes as native Lens's encoder writes them, so native samplers take the pack's conditioning."""
    loader, encode = NODES["LensPackModelLoader"](), NODES["LensPackTextEncode"]()
    _, te, _ = loader.load("lens_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, negative = encode.encode(te, "a red fox", "")
    assert len(positive) == 1 and len(negative) == 1
    tensor, extras = positive[0]
    assert tensor.ndim == 3 and tensor.shape[-1] == 4 * 64 and tensor.dtype == torch.float32
    assert set(extras) == {"attention_mask", "num_layers_stacked", "pooled_output"}
    assert extras["attention_mask"].dtype == torch.int64 and extras["attention_mask"].shape == tensor.shape[:2]
    assert extras["attention_mask"].all() and extras["num_layers_stacked"] == 4 and extras["pooled_output"] is None
    empty, empty_extras = negative[0]
    assert empty.shape == (1, 0, 4 * 64) and empty_extras["attention_mask"].shape == (1, 0)
    assert empty_extras["attention_mask"].dtype == torch.int64


def _sampled(model, positive, negative, latent=None, seed=3):
    latent = latent or {"samples": torch.zeros(1, 128, 3, 4)}
    return NODES["LensPackSampler"]().run(model, positive, negative, latent, seed, 2, 5.0, 1.0)[0]["samples"]


def test_native_conditioning_and_latents_give_the_same_image(models_dir):
    loader = NODES["LensPackModelLoader"]()
    model, te, _ = loader.load("lens_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, empty = NODES["LensPackTextEncode"]().encode(te, "a red fox", "")
    features, extras = positive[0]
    baseline = _sampled(model, positive, empty)
    padded_empty = [[torch.zeros_like(features), {"attention_mask": torch.zeros(features.shape[:2], dtype=torch.int64)}]]
    zeroed_out = [[torch.zeros_like(features), dict(extras)]]  # ConditioningZeroOut keeps the positive's mask
    bool_mask = [[features, {"attention_mask": extras["attention_mask"].bool(), "some_other_key": 1}]]
    assert torch.allclose(_sampled(model, positive, padded_empty), baseline, atol=1e-5)
    assert torch.allclose(_sampled(model, positive, zeroed_out), baseline, atol=1e-5)
    assert torch.allclose(_sampled(model, bool_mask, empty), baseline, atol=1e-5)
    native_empty_latent = {"samples": torch.zeros(1, 4, 6, 8)}  # EmptyLatentImage at 64 x 48 pixels
    assert torch.equal(_sampled(model, positive, empty, native_empty_latent), baseline)
    assert not torch.equal(_sampled(model, positive, empty, seed=4), baseline)


def test_sampler_noise_is_comfyui_noise(models_dir, monkeypatch):
    """The sampler nodes start from exactly the noise ComfyUI's prepare_noise draws for the seed."""
    sampler_module = __import__(pack.__name__ + ".nodes.sampler", fromlist=["x"])
    started = []
    monkeypatch.setattr(sampler_module, "sample", lambda dit, noise, *a, **k: started.append(noise) or noise)
    model, _, _ = NODES["LensPackModelLoader"]().load("lens_turbo_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors",
                                                      "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive = [[torch.randn(1, 3, 4 * 64), {"attention_mask": torch.ones(1, 3, dtype=torch.int64)}]]
    NODES["LensPackTurboSampler"]().run(model, positive, {"samples": torch.zeros(2, 128, 3, 4)}, 2**64 - 1, 4)
    NODES["LensPackTurboSampler"]().run(model, positive, {"samples": torch.zeros(2, 128, 3, 4), "batch_index": [3, 1]}, 42, 4)
    torch.manual_seed(2**64 - 1)
    assert torch.equal(started[0], torch.randn(2, 128, 3, 4))
    torch.manual_seed(42)
    draws = [torch.randn(1, 128, 3, 4) for _ in range(4)]
    assert torch.equal(started[1], torch.cat([draws[3], draws[1]]))


def test_conditioning_that_cannot_be_used_is_refused(models_dir):
    model, te, _ = NODES["LensPackModelLoader"]().load("lens_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors",
                                                       "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, empty = NODES["LensPackTextEncode"]().encode(te, "a red fox", "")
    with pytest.raises(ValueError, match="positive conditioning has 2 entries .*Conditioning Combine"):
        _sampled(model, positive + positive, empty)
    concatenated = [[torch.cat([positive[0][0]] * 2, dim=1), positive[0][1]]]
    with pytest.raises(ValueError, match="attention_mask has shape \\[1, 25\\] but its features have 50 tokens"):
        _sampled(model, concatenated, empty)
    with pytest.raises(ValueError, match="Lens latents have 128"):
        _sampled(model, positive, empty, {"samples": torch.ones(1, 4, 6, 8)})  # an SD latent with content


def test_bad_inputs_give_messages(models_dir, caplog):
    loader = NODES["LensPackModelLoader"]()
    with pytest.raises(Exception, match="FLUX.2 VAE.*not a Lens denoiser"):
        loader.load("../vae/flux2-vae.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    model, te, vae = loader.load("lens_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, negative = NODES["LensPackTextEncode"]().encode(te, "x", "")
    sdxl_latent = {"samples": torch.randn(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="Lens latents have 128"):
        NODES["LensPackSampler"]().run(model, positive, negative, sdxl_latent, 0, 2, 5.0, 1.0)
    clip_cond = [[torch.zeros(1, 77, 768), {}]]
    latent = {"samples": torch.zeros(1, 128, 2, 2)}
    with pytest.raises(ValueError, match="GPT-OSS features"):
        NODES["LensPackSampler"]().run(model, clip_cond, negative, latent, 0, 2, 5.0, 1.0)
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        NODES["LensPackTurboSampler"]().run(model, positive, latent, 0, 1)
    assert "does not look like Lens-Turbo" in caplog.text
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        NODES["LensPackEmptyLatent"]().generate(1024, "custom", 1000, 3000, 1)
    assert "snapped to 1008x3008" in caplog.text and "outside the trained" in caplog.text


def test_sampler_refuses_bad_inputs_before_the_model_moves(models_dir, monkeypatch):
    """A NaN conditioning or a bad setting must fail before 8 GB of denoiser go to the GPU."""
    LensInputError = __import__(pack.__name__ + ".lens_core", fromlist=["x"]).LensInputError

    model, te, _ = NODES["LensPackModelLoader"]().load("lens_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors",
                                                       "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, negative = NODES["LensPackTextEncode"]().encode(te, "x", "")

    def moved():
        raise AssertionError("the model was moved before its inputs were checked")

    monkeypatch.setattr(model, "use", moved)
    nan_positive = [[torch.full_like(positive[0][0], float("nan")), positive[0][1]]]
    latent = {"samples": torch.zeros(1, 128, 2, 2)}
    with pytest.raises(LensInputError, match="the positive conditioning holds NaN"):
        NODES["LensPackSampler"]().run(model, nan_positive, negative, latent, 0, 2, 5.0, 1.0)
    with pytest.raises(LensInputError, match="cfg must be >= 0"):
        NODES["LensPackSampler"]().run(model, positive, negative, latent, 0, 2, -1.0, 1.0)


def test_non_finite_and_odd_inputs_give_messages(models_dir):
    LensInputError = __import__(pack.__name__ + ".lens_core", fromlist=["x"]).LensInputError  # the pack's own copy

    model, te, vae = NODES["LensPackModelLoader"]().load("lens_turbo_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors",
                                                         "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, _ = NODES["LensPackTextEncode"]().encode(te, "x", "")
    turbo = NODES["LensPackTurboSampler"]()
    with pytest.raises(LensInputError, match="the LATENT input holds NaN"):
        turbo.run(model, positive, {"samples": torch.full((1, 128, 2, 2), float("nan"))}, 0, 1)
    with pytest.raises(LensInputError, match="the IMAGE input of Lens VAE Encode holds NaN"):
        NODES["LensPackVAEEncode"]().encode(vae, torch.full((1, 32, 32, 3), float("nan")))
    nan_cond = [[positive[0][0].clone().fill_(float("inf")), positive[0][1]]]
    with pytest.raises(LensInputError, match="the positive conditioning holds NaN"):
        turbo.run(model, nan_cond, {"samples": torch.zeros(1, 128, 2, 2)}, 0, 1)
    no_extras = [[positive[0][0], None]]
    assert turbo.run(model, no_extras, {"samples": torch.zeros(1, 128, 2, 2)}, 0, 1)[0]["samples"].shape == (1, 128, 2, 2)
    empty = NODES["LensPackEmptyLatent"]()
    with pytest.raises(LensInputError, match="width must be between 16 and 4096, got 1000000"):
        empty.generate(1024, "custom", 1_000_000, 1024, 1)
    for batch in (0, -1):
        with pytest.raises(LensInputError, match="batch must be between 1 and 64"):
            empty.generate(1024, "1:1", 1024, 1024, batch)


def test_progress_is_reported_every_step(models_dir, monkeypatch):
    bridge = __import__(pack.__name__ + ".nodes.comfy_bridge", fromlist=["x"])
    sampler_module = __import__(pack.__name__ + ".nodes.sampler", fromlist=["x"])
    seen = []

    class Recording(bridge.Progress):
        shows_previews = True

        def update(self, step, total, preview_image=None):
            seen.append((step, total, preview_image.size))

    monkeypatch.setattr(sampler_module, "Progress", Recording)
    loader = NODES["LensPackModelLoader"]()
    model, te, _ = loader.load("lens_turbo_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, _ = NODES["LensPackTextEncode"]().encode(te, "x", "")
    NODES["LensPackTurboSampler"]().run(model, positive, {"samples": torch.zeros(1, 128, 3, 4)}, 0, 4)
    assert seen == [(i, 4, (8, 6)) for i in range(1, 5)]


def test_cancel_stops_sampling_promptly(models_dir, monkeypatch):
    """Inside ComfyUI, Cancel makes throw_exception_if_processing_interrupted raise; the sampler polls it every step."""
    bridge = __import__(pack.__name__ + ".nodes.comfy_bridge", fromlist=["x"])

    class Interrupted(Exception):
        pass

    class FakeModelManagement:
        polls = 0

        @classmethod
        def throw_exception_if_processing_interrupted(cls):
            cls.polls += 1
            if cls.polls == 2:
                raise Interrupted()

        unet_offload_device = staticmethod(lambda: torch.device("cpu"))
        intermediate_device = staticmethod(lambda: torch.device("cpu"))
        soft_empty_cache = staticmethod(lambda: None)
        free_memory = staticmethod(lambda nbytes, device: None)

    loader = NODES["LensPackModelLoader"]()
    model, te, _ = loader.load("lens_turbo_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, _ = NODES["LensPackTextEncode"]().encode(te, "x", "")
    monkeypatch.setattr(bridge, "model_management", FakeModelManagement)
    steps = []
    original = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a: steps.append(1) or original(*a))
    with pytest.raises(Interrupted):
        NODES["LensPackTurboSampler"]().run(model, positive, {"samples": torch.zeros(1, 128, 3, 4)}, 0, 4)
    assert len(steps) == 1  # stopped before the second step


def test_cached_prompt_does_not_move_the_encoder(models_dir, tmp_path, monkeypatch):
    encode_module = __import__(pack.__name__ + ".nodes.encode", fromlist=["x"])
    monkeypatch.setattr(encode_module, "_prompt_cache", __import__("lens_core").PromptCache(tmp_path / "cache"))
    loader = NODES["LensPackModelLoader"]()
    _, te, _ = loader.load("lens_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    uses = []
    original = te.use
    monkeypatch.setattr(te, "use", lambda: uses.append(1) or original())
    encode = NODES["LensPackTextEncode"]()
    first = encode.encode(te, "a lighthouse in fog", "blurry")
    second = encode.encode(te, "a lighthouse in fog", "blurry")
    assert len(uses) == 1  # the second call is served from the cache without moving the encoder
    assert torch.equal(first[0][0][0], second[0][0][0]) and torch.equal(first[1][0][0], second[1][0][0])
    encode.encode(te, "a new prompt", "")
    assert len(uses) == 2


def test_loader_fingerprint_follows_the_file_content(models_dir):
    """A fine-tune of the same size copied with its old modification time (cp -p, rsync -a, tar) is a new model;
    touching a file is not."""
    import os

    from safetensors.torch import load_file, save_file

    loader = NODES["LensPackModelLoader"]
    names = ("lens_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors")
    before = loader.IS_CHANGED(*names, variant="auto")
    vae_file = models_dir / "vae" / "flux2-vae.safetensors"
    original = vae_file.read_bytes()
    stat = vae_file.stat()
    os.utime(vae_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert loader.IS_CHANGED(*names, variant="auto") == before
    tuned = {k: v.clone() for k, v in load_file(str(vae_file)).items()}
    tuned["decoder.conv_out.bias"] += 0.5
    try:
        save_file(tuned, str(vae_file))
        os.utime(vae_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert vae_file.stat().st_size == stat.st_size
        assert loader.IS_CHANGED(*names, variant="auto") != before
    finally:
        vae_file.write_bytes(original)
    assert "gone.safetensors:unreadable" in loader.IS_CHANGED("gone.safetensors", names[1], names[2])


def test_loader_logs_device_dtype_and_sizes(models_dir, caplog):
    with caplog.at_level(logging.INFO, logger="lens_core"):
        NODES["LensPackModelLoader"]().load("lens_turbo_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors",
                                            "auto", "auto", False, "cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Lens Model Loader:")]
    assert len(lines) == 3
    assert lines[0].startswith("Lens Model Loader: denoiser lens_turbo_bf16.safetensors (turbo): ") and "MB of weights, float32, on cpu" in lines[0]
    assert "the Lens models on cpu in float32 (auto: CPUs compute fp32" in caplog.text


def test_lora_loader_node_chains_and_strength_zero_is_identity(models_dir):
    model, te, _ = NODES["LensPackModelLoader"]().load("lens_turbo_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors",
                                                       "flux2-vae.safetensors", "auto", "fp32", False, "gpu")
    positive, _ = NODES["LensPackTextEncode"]().encode(te, "a red fox", "")
    latent = {"samples": torch.zeros(1, 128, 3, 4)}
    turbo, lora_node = NODES["LensPackTurboSampler"](), NODES["LensPackLoraLoader"]()
    base = turbo.run(model, positive, latent, 1, 2)[0]["samples"]
    (off,) = lora_node.apply(model, "lens_turbo_style_lora.safetensors", 0.0)
    assert off is model
    (once,) = lora_node.apply(model, "lens_turbo_style_lora.safetensors", 0.5)
    (twice,) = lora_node.apply(once, "lens_turbo_style_lora.safetensors", 0.5)
    (full,) = lora_node.apply(model, "lens_turbo_style_lora.safetensors", 1.0)
    assert twice.extras["loras"] == ("lens_turbo_style_lora.safetensors@0.5",) * 2 and twice.extras["variant"] == "turbo"
    with_lora = turbo.run(once, positive, latent, 1, 2)[0]["samples"]
    assert not torch.allclose(with_lora, base, atol=1e-3)
    assert torch.allclose(turbo.run(twice, positive, latent, 1, 2)[0]["samples"], turbo.run(full, positive, latent, 1, 2)[0]["samples"], atol=1e-4)
    assert torch.equal(turbo.run(model, positive, latent, 1, 2)[0]["samples"], base)  # the loader's model is unchanged


def test_block_swap_from_the_loader_gives_the_same_image(models_dir):
    loader, turbo = NODES["LensPackModelLoader"](), NODES["LensPackTurboSampler"]()
    names = ("lens_turbo_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False, "gpu", False)
    model, te, _ = loader.load(*names, 1)
    positive, _ = NODES["LensPackTextEncode"]().encode(te, "a red fox", "")
    swapped = turbo.run(model, positive, {"samples": torch.zeros(1, 128, 3, 4)}, 1, 2)[0]["samples"]
    assert model.model.block_swap.indices == [1]
    model, _, _ = loader.load(*names, 0)
    unswapped = turbo.run(model, positive, {"samples": torch.zeros(1, 128, 3, 4)}, 1, 2)[0]["samples"]
    assert model.model.block_swap is None
    assert torch.equal(unswapped, swapped)


def test_two_loader_nodes_on_one_file_keep_their_own_settings(models_dir):
    """They share the weights (one load), not the state: each node's block swap applies when its model runs,
    also through a LoRA clone of it."""
    names = ("lens_turbo_bf16.safetensors", "gpt_oss_20b_nvfp4.safetensors", "flux2-vae.safetensors", "auto", "fp32", False,
             "gpu", False)
    swapping, plain = NODES["LensPackModelLoader"](), NODES["LensPackModelLoader"]()
    swapped_model, te, _ = swapping.load(*names, 1)
    plain_model, _, _ = plain.load(*names, 0)
    assert swapped_model.model is plain_model.model  # one copy of the weights
    (lora_model,) = NODES["LensPackLoraLoader"]().apply(swapped_model, "lens_turbo_style_lora.safetensors", 0.5)
    positive, _ = NODES["LensPackTextEncode"]().encode(te, "a red fox", "")
    turbo, latent = NODES["LensPackTurboSampler"](), {"samples": torch.zeros(1, 128, 3, 4)}
    plain_out = turbo.run(plain_model, positive, latent, 1, 2)[0]["samples"]
    assert plain_model.model.block_swap is None
    swapped_out = turbo.run(swapped_model, positive, latent, 1, 2)[0]["samples"]
    assert swapped_model.model.block_swap.indices == [1]
    assert torch.equal(swapped_out, plain_out)
    turbo.run(lora_model, positive, latent, 1, 2)
    assert lora_model.model.block_swap.indices == [1] and plain_model.model.block_swap.indices == [1]  # shared blocks
    assert torch.equal(turbo.run(plain_model, positive, latent, 1, 2)[0]["samples"], plain_out)
    assert plain_model.model.block_swap is None and lora_model.model.block_swap is None


def test_concurrent_loads_of_one_file_load_it_once(models_dir, monkeypatch):
    import threading
    import time

    loader_module = __import__(pack.__name__ + ".nodes.loader", fromlist=["x"])
    monkeypatch.setattr(loader_module, "_cache", {})
    calls = []

    def slow_load(*args, **kwargs):
        calls.append(1)
        time.sleep(0.2)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(loader_module._load_once(
        "vae", str(models_dir / "vae" / "flux2-vae.safetensors"), None, slow_load))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1


def test_text_encoder_placement_auto_streams_experts_only_where_the_gpu_is_too_small(monkeypatch):
    from types import SimpleNamespace

    from lens_core.demo import demo_text_encoder
    from lens_core.device import model_bytes
    from lens_core.memory import placement

    gb = 10**9
    assert not placement.streams_experts_to_fit(int(11.4 * gb), 16 * gb)  # the real encoder on a 16 GB card
    assert placement.streams_experts_to_fit(int(11.4 * gb), 12 * gb)  # and on a 12 GB card
    encoder = demo_text_encoder()
    on_gpu = model_bytes(encoder) - encoder.embed_tokens.weight.nbytes
    cuda = torch.device("cuda")
    for total, expected in ((on_gpu + placement.ENCODER_RESERVE_BYTES, "gpu"),
                            (on_gpu + placement.ENCODER_RESERVE_BYTES - 1, "gpu_stream_experts")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, total=total: SimpleNamespace(total_memory=total))
        assert placement.text_encoder_placement("auto", encoder, cuda) == expected
    assert placement.text_encoder_placement("auto", encoder, torch.device("cpu")) == "gpu"  # the compute device
    assert placement.text_encoder_placement("cpu", encoder, cuda) == "cpu"


