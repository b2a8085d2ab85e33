"""Lens models under ComfyUI's model manager, with a stand-in of its manager (CI has no ComfyUI): loaded
through it, kept between runs, unloaded by it, and moved by hand where a ComfyUI's manager cannot take them
(tests/test_real_comfyui.py runs the same against a real ComfyUI checkout, where one is given)."""


import pytest
import torch
from pack import import_pack
from torch import nn

pack = import_pack()
bridge = __import__(pack.__name__ + ".nodes.comfy_bridge", fromlist=["x"])
managed_module = __import__(pack.__name__ + ".nodes.managed", fromlist=["x"])
GPU = torch.device("cuda")


class RecordingModel(nn.Module):
    """A model that records where it is moved (a CPU-only machine cannot move anything to a GPU)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.place, self.moves = torch.device("cpu"), []

    @property
    def device(self):
        return self.place

    def move(self, device, keep_host_copy=False):
        """The Lens models' mover (what the patcher calls), recorded."""
        if torch.device(device) != self.place:
            self.place = torch.device(device)
            self.moves.append(self.place)
        return self


class StandInPatcher:
    """comfy.model_patcher.ModelPatcher as far as the pack relies on it: its constructor, and the methods the pack's
    subclass replaces (ComfyUI's own would move the model module by module)."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size

    def _not_for_lens_models(self, *args, **kwargs):
        raise AssertionError("ComfyUI's own method was called on a Lens model")

    loaded_size = lowvram_patch_counter = current_loaded_device = partially_load = _not_for_lens_models
    partially_unload = unpatch_model = detach = _not_for_lens_models


class StandInManager:
    """comfy.model_management as far as the pack uses it: a list of loaded models, loading and unloading them."""

    def __init__(self, accepts_full_load=True):
        self.loaded, self.requests, self.accepts_full_load = [], [], accepts_full_load

    def load_models_gpu(self, patchers, memory_required=0, force_patch_weights=False, **kwargs):
        if not self.accepts_full_load and "force_full_load" in kwargs:
            raise TypeError("load_models_gpu() got an unexpected keyword argument 'force_full_load'")
        for patcher in patchers:
            self.requests.append(patcher)
            if patcher not in self.loaded:
                patcher.partially_load(patcher.load_device, 1e32)
                self.loaded.insert(0, patcher)

    def unload_all_models(self):
        while self.loaded:
            self.loaded.pop().detach()

    unet_offload_device = staticmethod(lambda: torch.device("cpu"))
    soft_empty_cache = staticmethod(lambda: None)
    free_memory = staticmethod(lambda nbytes, device: None)


@pytest.fixture
def manager(monkeypatch):
    fake = StandInManager()
    monkeypatch.setattr(bridge, "model_management", fake)
    monkeypatch.setattr(bridge, "model_patcher", type("ModelPatcherModule", (), {"ModelPatcher": StandInPatcher}))
    return fake


def test_models_are_loaded_through_comfyui_and_stay_between_runs(manager):
    model = RecordingModel()
    for _ in range(2):  # two runs, each with the loader's fresh Managed for the same cached model
        with managed_module.Managed(model, GPU, keep_loaded=False).use() as on_device:
            assert on_device is model and model.device == GPU
    assert model.moves == [GPU]  # moved once, kept on the GPU between runs: ComfyUI decides when it leaves
    assert len(manager.requests) == 2 and manager.requests[0] is manager.requests[1]
    patcher = manager.requests[0]
    assert patcher.size == sum(p.numel() * 4 for p in model.parameters()) and patcher.loaded_size() == patcher.size
    manager.unload_all_models()  # ComfyUI's "Unload models", or another node needing the memory
    assert model.device == torch.device("cpu") and patcher.loaded_size() == 0
    with managed_module.Managed(model, GPU).use():
        assert model.device == GPU
    assert model.moves == [GPU, torch.device("cpu"), GPU]


def test_a_lora_model_shares_its_base_models_entry(manager):
    base, lora = RecordingModel(), RecordingModel()
    lora.__dict__["base_model"] = base
    with managed_module.Managed(base, GPU).use():
        pass
    with managed_module.Managed(lora, GPU).use():
        assert lora.device == GPU  # its own side weights follow
    assert manager.requests[0] is manager.requests[1] and len(manager.loaded) == 1


@pytest.mark.parametrize("comfyui", ["dynamic VRAM", "another ModelPatcher"])
def test_where_comfyuis_manager_cannot_take_them_they_move_by_hand_decided_up_front(manager, monkeypatch, comfyui):
    """Defect: the fallback caught errors of ComfyUI's loading, which with dynamic VRAM runs in a worker thread whose
    errors never reach the caller. Now the path is chosen before loading, from the API that is present."""
    if comfyui == "dynamic VRAM":
        monkeypatch.setattr(bridge, "memory_management", type("MemoryManagement", (), {"aimdo_enabled": True}))
    else:
        monkeypatch.setattr(bridge, "model_patcher", type("ModelPatcherModule", (), {"ModelPatcher": object}))
    assert not bridge.model_manager_takes_lens_models()
    model = RecordingModel()
    with managed_module.Managed(model, GPU, keep_loaded=False).use():
        assert model.device == GPU
    assert model.moves == [GPU, torch.device("cpu")] and manager.requests == []


def test_an_error_of_comfyuis_manager_is_not_hidden(manager, monkeypatch):
    def failing_load(patchers, **kwargs):
        raise TypeError("load_models_gpu() got an unexpected keyword argument 'force_full_load'")

    monkeypatch.setattr(manager, "load_models_gpu", failing_load)
    model = RecordingModel()
    with pytest.raises(TypeError, match="force_full_load"):
        with managed_module.Managed(model, GPU).use():
            pass
    assert model.moves == []


def test_outside_comfyui_models_move_while_used():
    model = RecordingModel()
    with managed_module.Managed(model, GPU, keep_loaded=False).use():
        assert model.device == GPU
    with managed_module.Managed(model, GPU, keep_loaded=True).use():
        pass
    assert model.moves == [GPU, torch.device("cpu"), GPU]


def test_a_patcher_forgotten_without_unpatching_leaves_the_model_in_place(manager):
    model = RecordingModel()
    with managed_module.Managed(model, GPU).use():
        pass
    manager.requests[0].detach(unpatch_all=False)  # what ComfyUI does when a patcher is replaced or collected
    assert model.device == GPU and model.moves == [GPU]


def test_the_manager_counts_only_what_goes_to_the_gpu(manager):
    from lens_core.demo import demo_dit, demo_text_encoder
    from lens_core.device import model_bytes

    comfy_models = __import__(pack.__name__ + ".nodes.comfy_models", fromlist=["x"])
    dit = demo_dit()
    dit.swap_blocks(1)
    patcher = comfy_models.patcher_for(dit, GPU, torch.device("cpu"), StandInPatcher)
    assert patcher.size == model_bytes(dit) - model_bytes(dit.transformer_blocks[1])
    encoder = demo_text_encoder()
    encoder.set_expert_streaming(True)
    assert comfy_models.patcher_for(encoder, GPU, torch.device("cpu"), StandInPatcher).size < model_bytes(encoder)


def test_comfyuis_loads_and_unloads_go_through_the_page_locked_copies(manager, pinning):
    """A model with page-locked CPU copies (made on its first trip down from a real GPU) comes back from ComfyUI's
    unload without a copy: the meta device stands in for the GPU, and copying from it would raise."""
    from lens_core.demo import demo_dit

    dit = demo_dit()
    torch.manual_seed(0)
    inputs = (torch.randn(1, 6, 128), torch.tensor([0.5]), torch.randn(1, 3, 4, 64), None, (2, 3))
    with torch.no_grad():
        before = dit(*inputs)
    dit.move(torch.device("meta"), keep_host_copy=True).move("cpu")
    for _ in range(2):
        with managed_module.Managed(dit, torch.device("meta")).use() as on_device:
            assert on_device.device.type == "meta"
        manager.unload_all_models()
        assert dit.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(dit(*inputs), before)
