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
             "inpainting_keeps_the_latent_outside_the_mask", "the_text_encoder_and_vae_are_comfyuis_models", "shipped_workflows_run")
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
