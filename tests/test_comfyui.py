"""The pack inside two real ComfyUI releases (../shared/comfyui: 0.3.64, and 0.12.1 with dynamic VRAM), on the CPU, in
child processes (tests/comfyui_child.py runs tests/comfyui_scenarios.py there). Skipped with the reason when those
trees are absent (a user's clone); CI points LENS_SHARED_DIR at them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED

TESTS = Path(__file__).resolve().parent
RELEASES = ("0.3.64", "0.12.1")
SCENARIOS = ("ksampler_and_custom_sampling_match_the_pack_samplers", "the_patcher_is_the_one_comfyui_uses",
             "a_dropped_model_is_collected_after_comfyui_unloads_it", "lora_patches_load_and_unload_with_the_model",
             "a_partial_load_computes_what_a_full_load_computes", "comfyuis_own_nodes_take_the_model",
             "inpainting_keeps_the_latent_outside_the_mask", "the_text_encoder_and_vae_are_comfyuis_models", "shipped_workflows_run",
             "conditioning_is_native_layout", "native_conditioning_and_latents_give_the_same_image",
             "bad_inputs_are_refused_with_messages_before_the_model_loads", "progress_is_reported_every_step_and_cancel_stops_sampling",
             "a_cached_prompt_does_not_load_the_encoder", "the_loader_follows_file_content_and_logs_what_it_loaded",
             "lora_loader_chains_and_strength_zero_is_identity", "concurrent_loads_of_one_file_load_it_once",
             "the_loader_works_where_comfyui_makes_linear_weights_lazily", "warnings_reach_the_page_and_the_pack_names_its_version")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=RELEASES)
def comfyui(request, models_dir, tmp_path_factory):
    """Every scenario's result in one ComfyUI release (one child process: importing ComfyUI takes seconds)."""
    tree = SHARED / "comfyui" / request.param
    if not (tree / "comfy" / "model_patcher.py").is_file():
        pytest.skip(f"no ComfyUI {request.param} source tree at {tree} (set LENS_SHARED_DIR to the folder holding comfyui/)")
    work = tmp_path_factory.mktemp(f"comfyui-{request.param}")
    out = work / "results.json"
    env = {**os.environ, "PYTHONPATH": "", "LENS_CACHE_DIR": str(work / "cache")}  # a fresh prompt cache: the encoder runs
    run = subprocess.run([sys.executable, str(TESTS / "comfyui_child.py"), str(tree), str(models_dir), str(work), str(out), *SCENARIOS],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0 and out.is_file(), run.stderr[-6000:]
    return json.loads(out.read_text())


def result(comfyui, name):
    outcome = comfyui[name]
    assert outcome["ok"], outcome.get("error")
    return outcome["value"]


def test_ksampler_and_samplercustomadvanced_give_the_pack_samplers_image(comfyui):
    r = result(comfyui, "ksampler_and_custom_sampling_match_the_pack_samplers")
    assert r["std"] > 0.1
    assert r["ksampler"] < 1e-4 and r["custom"] < 1e-4
    assert r["plain_cfg_differs"] > 1e-3  # ComfyUI's plain CFG is another sampler: the guider is what makes it Lens's


def test_the_model_uses_the_patcher_class_comfyui_binds(comfyui):
    r = result(comfyui, "the_patcher_is_the_one_comfyui_uses")
    assert r == {"default": True, "follows_the_binding": True}


def test_a_model_the_graph_drops_is_collected_after_comfyui_unloads_it(comfyui):
    r = result(comfyui, "a_dropped_model_is_collected_after_comfyui_unloads_it")
    assert r["alive"] == [] and r["loaded"] == 0


def test_lora_patches_load_and_unload_with_the_model(comfyui):
    r = result(comfyui, "lora_patches_load_and_unload_with_the_model")
    assert r["lora_changes"] > 1e-3 and r["base_back"] == 0.0 and r["native_equal"] < 1e-5


def test_a_partial_load_computes_what_a_full_load_computes(comfyui):
    r = result(comfyui, "a_partial_load_computes_what_a_full_load_computes")
    assert r["cast_partial"] > r["cast_full"]  # the budget really left layers to be cast on use
    assert r["partial"] < 1e-5 and r["lora_changes"] > 1e-3
    assert r["dense"] < 1e-4  # the packed model with its LoRA computes as the same weights decoded


def test_comfyuis_own_nodes_take_the_model(comfyui):
    r = result(comfyui, "comfyuis_own_nodes_take_the_model")
    assert r["ksampler_finite"] and r["block_replace_same"] == 0.0 and r["block_replace_called"] == 2
    assert r["double_block_patches"] == 2 * 2  # two blocks, two steps
    assert r.get("easycache_finite", True)


def test_inpainting_keeps_the_latent_outside_the_mask(comfyui):
    r = result(comfyui, "inpainting_keeps_the_latent_outside_the_mask")
    assert r["outside"] < 1e-5 and r["inside"] > 0.1


def test_the_text_encoder_and_the_vae_are_under_comfyuis_manager(comfyui):
    r = result(comfyui, "the_text_encoder_and_vae_are_comfyuis_models")
    assert {"LensModel", "GptOssEncoder", "FluxVAEModel"} <= set(r["loaded"]) and r["after_unload"] == 0
    assert r["image"] == [1, 48, 64, 3]


def test_every_shipped_workflow_runs(comfyui):
    r = result(comfyui, "shipped_workflows_run")
    workflows = {p.stem for p in (TESTS.parent / "workflows").glob("*.json")}
    assert set(r) == workflows
    for name, outcome in r.items():
        assert outcome["images"] and outcome["finite"], name


def test_conditioning_is_native_lens_layout(comfyui):
    r = result(comfyui, "conditioning_is_native_layout")
    assert r["entries"] == [1, 1] and r["shape"][-1] == 4 * 64 and r["dtype"] == "torch.float32"
    assert r["keys"] == ["attention_mask", "num_layers_stacked", "pooled_output"]
    assert r["mask"][0] == "torch.int64" and r["mask"][1] == r["shape"][:2] and r["mask"][2]
    assert r["layers"] == 4 and r["pooled"] is None
    assert r["empty"] == [[1, 0, 4 * 64], [1, 0], "torch.int64"]


def test_every_spelling_of_the_empty_prompt_and_native_latents_give_the_same_image(comfyui):
    r = result(comfyui, "native_conditioning_and_latents_give_the_same_image")
    assert r["bool_mask"] < 1e-5
    # As long as the positive, the negative runs in one batch with it (not alone): float32 rounding differs, no more.
    assert r["padded_empty"] < 2e-4 and r["zeroed_out"] < 2e-4
    assert r["native_latent"] == 0.0 and r["other_seed"] > 1e-3


def test_bad_inputs_are_refused_with_messages_before_the_model_loads(comfyui):
    r = result(comfyui, "bad_inputs_are_refused_with_messages_before_the_model_loads")
    m = r["messages"]
    expected = {"combined": "positive conditioning has 2 entries .*Conditioning Combine",
                "concatenated": r"attention_mask has shape \[1, \d+\] but its features have \d+ tokens",
                "sd_latent": "Lens latents have 128", "clip": "GPT-OSS features", "nan_conditioning": "positive conditioning holds NaN",
                "negative_cfg": "cfg must be >= 0", "nan_latent": "the LATENT input holds NaN", "empty_latent": "this latent is empty",
                "nan_image": "the IMAGE input of Lens VAE Encode holds NaN", "not_lens": "this MODEL is not Lens",
                "vae_in_dit_slot": "FLUX.2 VAE.*not a Lens denoiser"}
    import re

    for name, pattern in expected.items():
        assert m[name] is not None and re.search(pattern, m[name]), (name, m[name])
        assert len(m[name]) < 2000
    assert r["loads"] == 0  # every one refused before ComfyUI loaded a model for it


def test_progress_every_step_and_cancel_stops_the_run(comfyui):
    r = result(comfyui, "progress_is_reported_every_step_and_cancel_stops_sampling")
    assert r["steps"] == [[i, 4] for i in range(1, 5)]
    assert r["cancelled"] and r["model_calls"] == 2


def test_a_cached_prompt_does_not_load_the_encoder(comfyui):
    r = result(comfyui, "a_cached_prompt_does_not_load_the_encoder")
    assert r["after_first"] == ["Holder"] and r["after_second"] == ["Holder"] and r["same"] == 0.0


def test_the_loader_follows_file_content_and_logs_each_model(comfyui):
    r = result(comfyui, "the_loader_follows_file_content_and_logs_what_it_loaded")
    assert r["touched_same"] and r["tuned_differs"] and r["same_size"]
    assert "gone.safetensors:unreadable" in r["missing"]
    assert len(r["log"]) == 3 and r["log"][0].startswith("Lens Model Loader: denoiser lens_turbo_bf16.safetensors (turbo): ")
    assert "of weights, float32, on cpu" in r["log"][0]


def test_the_lora_loader_chains_and_strength_zero_is_the_model_itself(comfyui):
    r = result(comfyui, "lora_loader_chains_and_strength_zero_is_identity")
    assert r["off_is_model"] and r["once_changes"] > 1e-3 and r["twice_is_full"] < 1e-4 and r["base_unchanged"] == 0.0


def test_concurrent_loads_of_one_file_load_it_once(comfyui):
    assert result(comfyui, "concurrent_loads_of_one_file_load_it_once") == {"loads": 1, "distinct": 1}


def test_the_loader_works_where_comfyui_builds_linear_layers_without_weights(comfyui):
    r = result(comfyui, "the_loader_works_where_comfyui_makes_linear_weights_lazily")
    assert r.get("same") == 0.0 or "skipped" in r


def test_warnings_reach_the_page_and_the_pack_names_its_version(comfyui):
    import lens_core

    r = result(comfyui, "warnings_reach_the_page_and_the_pack_names_its_version")
    assert r["real_send_sync"] == ["self", "event", "data", "sid"]
    assert [(event, sid) for event, _, sid in r["sent"]] == [("lens.warning", "client-1")] * 4
    messages = [message for _, message, _ in r["sent"]]
    assert messages[0] == "Lens Empty Latent: 1000x2200 snapped to 1008x2208 (multiples of 16)"
    assert "1008x2208 has aspect 0.46, outside the trained 1:2..2:1" in messages[1]
    assert "above the trained ~2.1 MP" in messages[2]
    assert "Lens-Turbo is distilled for 4 steps at CFG 1" in messages[3]
    assert r["load_log"] == [f"Lens node pack {lens_core.__version__}: 10 nodes"]
