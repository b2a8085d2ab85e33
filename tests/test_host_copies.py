"""Whole models keep page-locked CPU copies across their trips to the GPU: moving back copies nothing, results stay
the same, the budget holds, no GPU tensor stays referenced, and the copies are released with their weights.

The "GPU" is the meta device: it holds no data, so a model can come back from it only by pointing at the CPU copies
it kept (copying from it raises). Page-locked memory is handed out by a recording stand-in (the `pinning` fixture).
"""

import gc
import warnings

import pytest
import torch
from cuda_stand_in import RecordingPinnedMemory
from pack import import_pack
from te_files import expert_banks

from lens_core import apply_loras
from lens_core.demo import DEMO_DIT, demo_dit, demo_text_encoder, demo_vae
from lens_core.dit.lora import LoRA, LoRALayer
from lens_core.memory import pinned
from lens_core.memory.host_copies import host_copy, move_model, named_weights

META = torch.device("meta")


@pytest.fixture(autouse=True)
def inference():
    """As the pack runs its models: no autograd graph (which would hold the weights of every output kept)."""
    with torch.no_grad():
        yield


def dit_inputs():
    torch.manual_seed(5)
    return (torch.randn(1, 6, DEMO_DIT.in_channels), torch.tensor([0.7]),
            torch.randn(1, 4, DEMO_DIT.text_layers, DEMO_DIT.text_width), None, (2, 3))


def weights(module):
    return [*module.parameters(), *module.buffers()]


def pinned_bytes(module) -> int:
    """Bytes of the module's weights that have page-locked CPU copies."""
    return sum(t.numel() * t.element_size() for _, t in named_weights(module) if host_copy(t) is not None)


def a_lora(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = DEMO_DIT.hidden
    layer = LoRALayer(torch.randn(4, hidden, generator=generator) * 0.1, torch.randn(341, 4, generator=generator) * 0.1, 1.0)
    return LoRA({"transformer_blocks.0.img_mlp.w1": layer}, "in memory", [])


def test_a_denoiser_comes_back_from_the_gpu_without_a_copy(pinning):
    dit = demo_dit()
    before = dit(*dit_inputs())
    dit.move(META, keep_host_copy=True)
    assert all(w.device == META for w in weights(dit))  # nothing left behind on the CPU
    allocated = dict(pinning.allocated)
    assert sum(allocated.values()) == sum(map(pinned.footprint, weights(dit))) == pinned_bytes(dit) + sum(
        pinned.footprint(w) - w.numel() * w.element_size() for w in weights(dit))
    for _ in range(2):
        dit.move("cpu")  # would raise if it copied from the meta device
        assert all(pinning.holds(w) for w in weights(dit))
        assert torch.equal(dit(*dit_inputs()), before)
        dit.move(META)
    assert pinning.allocated == allocated and pinning.freed == []  # the same copies, every trip
    del dit
    gc.collect()
    assert sorted(pinning.freed) == sorted(allocated) and pinning.allocated == {}


def live_tensors_on(device: torch.device) -> set[int]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device == device}


def test_no_gpu_tensor_stays_referenced_after_the_model_leaves_the_gpu(pinning):
    """Defect: the copies made on the way up were kept, so a model moved off the GPU by anything but the pack's own
    mover (ComfyUI, a user's `.to("cpu")`) left all of its GPU memory referenced. Nothing holds them now."""
    for leave in (lambda dit: dit.move("cpu"), lambda dit: dit.to_empty(device="cpu")):
        before = live_tensors_on(META)
        dit = demo_dit()
        dit.move(META, keep_host_copy=True)
        assert len(live_tensors_on(META) - before) >= len(weights(dit))
        leave(dit)
        assert live_tensors_on(META) <= before


def test_fp8_weights_come_back_too(pinning):
    """fp8 weights and their scales are buffers, not parameters: they travel the same way."""
    from lens_core.dit.quant import Fp8Linear, to_fp8_weights

    dit = to_fp8_weights(demo_dit().bfloat16(), fast=False)
    assert any(isinstance(m, Fp8Linear) for m in dit.modules())
    before = dit(*dit_inputs())
    dit.move(META, keep_host_copy=True).move("cpu")
    assert all(pinning.holds(w) for w in weights(dit))
    assert torch.equal(dit(*dit_inputs()), before)


def test_swapped_blocks_stay_page_locked_on_the_cpu_while_the_rest_goes_up(pinning):
    dit = demo_dit()
    before = dit(*dit_inputs())
    dit.swap_blocks(1)
    dit.move(META, keep_host_copy=True)
    assert all(w.device.type == "cpu" and pinning.holds(w) for w in weights(dit.transformer_blocks[1]))
    assert all(w.device == META for w in weights(dit.transformer_blocks[0]))
    swapped = [w.data_ptr() for w in weights(dit.transformer_blocks[1])]
    dit.move("cpu")
    assert [w.data_ptr() for w in weights(dit.transformer_blocks[1])] == swapped  # untouched
    assert torch.equal(dit(*dit_inputs()), before)


def test_changing_the_block_swap_reuses_the_page_locked_copies(pinning):
    dit = demo_dit()
    before = dit(*dit_inputs())
    dit.move(META, keep_host_copy=True)
    used = pinning.used
    dit.swap_blocks(1)  # on the "GPU": the block goes back to its CPU copy (copying from meta would raise)
    assert all(pinning.holds(w) for w in weights(dit.transformer_blocks[1]))
    dit.swap_blocks(0)
    dit.swap_blocks(1)
    assert pinning.used == used  # nothing page-locked twice
    dit.move("cpu")
    assert torch.equal(dit(*dit_inputs()), before)


def test_casts_reach_every_weight_swapped_blocks_and_the_token_embedding_included():
    """Defect: the models' `_apply` overrides made `.to(dtype)` skip the swapped blocks and the token embedding."""
    dit = demo_dit()
    dit.swap_blocks(1)
    dit.to(torch.bfloat16)
    assert {w.dtype for w in dit.parameters()} == {torch.bfloat16}
    encoder = demo_text_encoder()
    ids = torch.randint(0, 1000, (1, 7))
    before = encoder.features(ids, layers=(2, 5))
    encoder.to(torch.bfloat16)
    assert encoder.embed_tokens.weight.dtype == torch.bfloat16 and encoder.inv_freq.dtype == torch.float32
    after = encoder.features(ids, layers=(2, 5))
    assert all((a.float() - b).abs().max() < 0.1 * b.abs().max() for a, b in zip(after, before))  # bf16 rounding only


def test_the_text_encoder_and_its_expert_banks_come_back_without_a_copy(pinning):
    encoder = demo_text_encoder()
    ids = torch.randint(0, 1000, (1, 7))
    before = encoder.features(ids, layers=(2, 5))
    encoder.move(META, keep_host_copy=True)
    assert all(w.device == META for bank in expert_banks(encoder) for w in weights(bank))
    assert encoder.embed_tokens.weight.device.type == "cpu" and not pinning.holds(encoder.embed_tokens.weight)
    encoder.move("cpu")
    assert all(pinning.holds(w) for bank in expert_banks(encoder) for w in weights(bank))
    assert all(torch.equal(a, b) for a, b in zip(encoder.features(ids, layers=(2, 5)), before))


def test_streamed_expert_banks_stay_page_locked_on_the_cpu(pinning):
    encoder = demo_text_encoder()
    ids = torch.randint(0, 1000, (1, 9))
    before = encoder.features(ids, layers=(1, 3))
    encoder.set_expert_streaming(True)
    encoder.move(META, keep_host_copy=True)
    banks = [w for bank in expert_banks(encoder) for w in weights(bank)]
    assert all(w.device.type == "cpu" and pinning.holds(w) for w in banks)
    assert encoder.layers[0].self_attn.q_proj.weight.device == META
    encoder.set_expert_streaming(False)  # the banks go up too
    assert all(w.device == META for bank in expert_banks(encoder) for w in weights(bank))
    encoder.move("cpu")
    assert all(torch.equal(a, b) for a, b in zip(encoder.features(ids, layers=(1, 3)), before))


def test_the_vae_comes_back_without_a_copy(pinning):
    vae = demo_vae()
    latent = torch.randn(1, vae.latent_channels, 2, 2, generator=torch.Generator().manual_seed(1))
    before = vae.decode(latent)
    vae.move(META, keep_host_copy=True).move("cpu")
    assert torch.equal(vae.decode(latent), before)


def test_a_loras_copies_are_its_own_and_go_with_it(pinning):
    """Defect: a LoRA clone's weights were page-locked into its base model's copies, which only grew: every
    re-applied LoRA left its page-locked copy behind. Now the shared weights keep one copy and a dropped LoRA frees its own."""
    dit = demo_dit()
    dit.move(META, keep_host_copy=True).move("cpu")
    base_slabs = dict(pinning.allocated)
    for seed in range(3):  # a LoRA applied, used and replaced, as a user tweaking a workflow does
        patched = apply_loras(dit, [(a_lora(seed), 1.0)])
        patched.move(META, keep_host_copy=True)
        lora_slabs = {ptr: size for ptr, size in pinning.allocated.items() if ptr not in base_slabs}
        lora_weights = [w for name, w in patched.named_parameters() if ".downs." in name or ".ups." in name]
        assert sum(lora_slabs.values()) == sum(map(pinned.footprint, lora_weights)) > 0
        patched.move("cpu")
        assert torch.equal(patched(*dit_inputs()), apply_loras(demo_dit(), [(a_lora(seed), 1.0)])(*dit_inputs()))
        del patched, lora_weights
        gc.collect()
        assert pinning.allocated == base_slabs  # the LoRA's copies are gone, the base's stay


def test_a_loras_module_tables_are_its_own():
    """Defect: a LoRA clone shared its patched modules' parameter tables with the base model."""
    dit = demo_dit()
    patched = apply_loras(dit, [(a_lora(), 1.0)])
    base_block, patched_block = dit.transformer_blocks[0], patched.transformer_blocks[0]
    assert patched_block is not base_block
    assert patched_block._parameters is not base_block._parameters and patched_block._buffers is not base_block._buffers
    patched_block.img_mlp._parameters.clear()
    assert patched_block.img_mlp is not base_block.img_mlp


def test_the_budget_caps_what_is_page_locked_and_the_rest_stays_ordinary(monkeypatch):
    dit = demo_dit()
    before = dit(*dit_inputs())
    total = sum(map(pinned.footprint, weights(dit)))
    monkeypatch.setattr(pinned, "SLAB_BYTES", total // 8)
    monkeypatch.setattr(pinned, "provider", RecordingPinnedMemory(limit=total // 2))
    move_model(dit, META, keep_host_copy=True)
    assert 0 < pinned.provider.used <= total // 2
    homes = sum(host_copy(w) is not None for w in weights(dit))
    assert 0 < homes < len(weights(dit))
    dit.to_empty(device="cpu")  # the rest would have to be copied from the "GPU": fill them again from the file
    dit.load_state_dict(demo_dit().state_dict())
    assert torch.equal(dit(*dit_inputs()), before)


def test_move_while_used_keeps_the_copy_for_the_way_back(pinning):
    managed_module = __import__(import_pack().__name__ + ".nodes.managed", fromlist=["x"])
    dit = demo_dit()
    before = dit(*dit_inputs())
    managed = managed_module.Managed(dit, device=META, keep_loaded=False)
    with managed.use() as model:
        assert model.device == META
    assert dit.device.type == "cpu" and torch.equal(dit(*dit_inputs()), before)
    assert pinned_bytes(dit) > 0
