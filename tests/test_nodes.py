"""The node pack's definitions and example workflows, without running ComfyUI (tests/test_comfyui.py runs them inside
real ComfyUI releases): every node documented, every workflow consistent with the nodes it names."""

import json

import pytest
import torch
from pack import ROOT, import_pack
from workflow_runner import widget_names

pack = import_pack()
NODES = pack.NODE_CLASS_MAPPINGS
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
GGUF_ENCODER_REPO = "https://huggingface.co/ggml-org/gpt-oss-20b-GGUF"  # llama.cpp's own GPT-OSS-20B GGUF
GGUF_DENOISER_REPO = "https://huggingface.co/rootonchair/Lens-Turbo-GGUF"  # stable-diffusion.cpp conversions of Lens-Turbo


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


def test_the_example_workflows_exist():
    assert {p.stem for p in WORKFLOWS} == {"lens_text_to_image", "lens_turbo_text_to_image", "lens_img2img", "lens_lora",
                                           "lens_turbo_gguf", "lens_inpaint"}


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
            assert node["type"] in ("SaveImage", "LoadImage", "SetLatentNoiseMask", "Note")
    for _, src, _, dst, _, _ in data["links"]:
        assert src in ids and dst in ids
    loaders = [n for n in data["nodes"] if n["type"] == "LensPackModelLoader"]
    models = loaders[0]["properties"]["models"] if loaders else []
    assert models and all(m["url"] in (f"https://huggingface.co/Comfy-Org/Lens/resolve/main/{m['directory']}/{m['name']}",
                                       f"{GGUF_ENCODER_REPO}/resolve/main/{m['name']}",
                                       f"{GGUF_DENOISER_REPO}/resolve/main/{m['name']}") for m in models)
    named = {n["widgets_values"][i] for n in loaders for i in range(3)}  # every file a loader names has a download
    assert named == {m["name"] for m in models}
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
        for repo in (GGUF_ENCODER_REPO, GGUF_DENOISER_REPO):
            if any(m["url"].startswith(repo) for m in models):
                assert repo in note


def test_text_encoder_placement_auto_streams_experts_only_where_the_gpu_is_too_small(monkeypatch):
    """Outside ComfyUI (the library, the command line): the automatic placement of the text encoder."""
    from types import SimpleNamespace

    from lens_core import placement
    from lens_core.demo import demo_text_encoder

    encoder = demo_text_encoder()
    on_gpu = placement.weight_bytes(encoder, skip=("embed_tokens.",))
    cuda = torch.device("cuda")
    for total, expected in ((on_gpu + placement.ENCODER_RESERVE_BYTES, "gpu"),
                            (on_gpu + placement.ENCODER_RESERVE_BYTES - 1, "gpu_stream_experts")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, total=total: SimpleNamespace(total_memory=total))
        assert placement.text_encoder_placement("auto", encoder, cuda) == expected
    assert placement.text_encoder_placement("auto", encoder, torch.device("cpu")) == "gpu"  # the compute device
    assert placement.text_encoder_placement("cpu", encoder, cuda) == "cpu"
