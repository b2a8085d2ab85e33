"""Whole models keep page-locked CPU copies across their trips to the GPU: moving back copies nothing, results stay
the same, the page-locked budget holds, and the memory is released with the model.

The "GPU" is the meta device: it holds no data, so a model can come back from it only by pointing at the CPU copies
it kept (copying from it raises). Page-locking is CUDA's host registration, recorded (the `cudart` fixture).
"""

import gc
import logging
import platform

import pytest
import torch
from pack import import_pack

from lens_core import apply_loras
from lens_core.demo import DEMO_DIT, demo_dit, demo_text_encoder, demo_vae
from lens_core.dit.lora import LoRA, LoRALayer
from lens_core.memory import pinned
from lens_core.memory.host_copies import chunks, host_copies_of, pin_in_place

META = torch.device("meta")


def dit_inputs():
    torch.manual_seed(5)
    return (torch.randn(1, 6, DEMO_DIT.in_channels), torch.tensor([0.7]),
            torch.randn(1, 4, DEMO_DIT.text_layers, DEMO_DIT.text_width), None, (2, 3))


def weights(module):
    return [*module.parameters(), *module.buffers()]


def inside_registered(tensor, cudart) -> bool:
    return any(start <= tensor.data_ptr() < start + size for start, size in cudart.registered.items())


def test_a_denoiser_comes_back_from_the_gpu_without_a_copy(cudart):
    dit = demo_dit()
    before = dit(*dit_inputs())
    dit.move(META, keep_host_copy=True)
    assert all(w.device == META for w in weights(dit))  # nothing left behind on the CPU
    registered = dict(cudart.registered)
    assert sum(registered.values()) == host_copies_of(dit).nbytes == pinned.ledger.used > 0
    for _ in range(2):
        dit.move("cpu")  # would raise if it copied from the meta device
        assert all(inside_registered(w, cudart) for w in weights(dit))
        assert torch.equal(dit(*dit_inputs()), before)
        dit.move(META)
    assert cudart.registered == registered and cudart.unregistered == []  # the same copies, every trip
    del dit
    gc.collect()
    assert sorted(cudart.unregistered) == sorted(registered) and pinned.ledger.used == 0


def test_fp8_weights_come_back_too(cudart):
    """fp8 weights and their scales are buffers, not parameters: they travel the same way."""
    from lens_core.dit.quant import Fp8Linear, to_fp8_weights

    dit = to_fp8_weights(demo_dit().bfloat16(), fast=False)
    assert any(isinstance(m, Fp8Linear) for m in dit.modules())
    before = dit(*dit_inputs())
    dit.move(META, keep_host_copy=True).move("cpu")
    assert all(inside_registered(w, cudart) for w in weights(dit))
    assert torch.equal(dit(*dit_inputs()), before)


def test_block_swap_keeps_its_own_page_locked_blocks(cudart):
    dit = demo_dit()
    before = dit(*dit_inputs())
    dit.swap_blocks(1)
    swapped = [w.data_ptr() for w in weights(dit.transformer_blocks[1])]
    dit.move(META, keep_host_copy=True)
    assert [w.data_ptr() for w in weights(dit.transformer_blocks[1])] == swapped  # untouched, still on the CPU
    assert all(w.device == META for w in weights(dit.transformer_blocks[0]))
    dit.move("cpu")
    assert torch.equal(dit(*dit_inputs()), before)


def test_changing_the_block_swap_reuses_the_page_locked_copies(cudart):
    dit = demo_dit()
    before = dit(*dit_inputs())
    dit.move(META, keep_host_copy=True)
    used = pinned.ledger.used
    dit.swap_blocks(1)  # on the "GPU": the block goes back to its CPU copy (copying from meta would raise)
    assert all(inside_registered(w, cudart) for w in weights(dit.transformer_blocks[1]))
    dit.swap_blocks(0)
    dit.swap_blocks(1)
    assert pinned.ledger.used == used  # nothing page-locked twice
    dit.move("cpu")
    assert torch.equal(dit(*dit_inputs()), before)


def test_the_text_encoder_and_its_expert_banks_come_back_without_a_copy(cudart):
    encoder = demo_text_encoder()
    ids = torch.randint(0, 1000, (1, 7))
    before = encoder.features(ids, layers=(2, 5))
    encoder.move(META, keep_host_copy=True)
    assert all(t.device == META for bank in encoder.expert_banks() for t in bank.tensors())
    assert encoder.embed_tokens.weight.device.type == "cpu" and encoder.inv_freq.device == META
    encoder.move("cpu")
    assert all(inside_registered(t, cudart) for bank in encoder.expert_banks() for t in bank.tensors())
    assert encoder.inv_freq.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(encoder.features(ids, layers=(2, 5)), before))


def test_the_vae_comes_back_without_a_copy(cudart):
    vae = demo_vae()
    latent = torch.randn(1, vae.latent_channels, 2, 2, generator=torch.Generator().manual_seed(1))
    before = vae.decode(latent)
    vae.move(META, keep_host_copy=True).move("cpu")
    assert torch.equal(vae.decode(latent), before)


def test_a_denoiser_with_loras_shares_its_base_models_copies(cudart):
    dit = demo_dit()
    hidden = DEMO_DIT.hidden
    lora = LoRA({"transformer_blocks.0.img_mlp.w1": LoRALayer(torch.randn(4, hidden) * 0.1, torch.randn(341, 4) * 0.1, 1.0)},
                "in memory", [])
    patched = apply_loras(dit, [(lora, 1.0)])
    before = patched(*dit_inputs())
    patched.move(META, keep_host_copy=True)
    assert host_copies_of(patched) is host_copies_of(dit)
    dit.move("cpu")  # what ComfyUI's manager does: it moves the base model, which holds the shared weights
    patched.move("cpu")  # and the LoRA's own weights
    assert torch.equal(patched(*dit_inputs()), before)


def test_the_budget_caps_what_is_page_locked_and_the_rest_stays_ordinary(cudart, monkeypatch):
    dit = demo_dit()
    before = dit(*dit_inputs())
    total = pinned.packed_bytes(weights(dit))
    monkeypatch.setattr("lens_core.memory.host_copies.CHUNK_BYTES", total // 8)
    monkeypatch.setattr(pinned, "ledger", pinned.Ledger(total // 2))
    pin_in_place(dit)
    copies = host_copies_of(dit)
    assert 0 < copies.nbytes == pinned.ledger.used <= total // 2
    homes = sum(copies.is_home(w) for w in weights(dit))
    assert 0 < homes < len(weights(dit))
    assert torch.equal(dit(*dit_inputs()), before)  # the weights that moved into page-locked memory are the same


def test_chunks_keep_order_and_size(monkeypatch):
    monkeypatch.setattr("lens_core.memory.host_copies.CHUNK_BYTES", 4 * pinned.ALIGNMENT)
    sizes = (2 * pinned.ALIGNMENT, 2 * pinned.ALIGNMENT, 1, 9 * pinned.ALIGNMENT, 5, 7)
    tensors = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    groups = chunks(tensors)
    assert [len(g) for g in groups] == [2, 1, 1, 2]  # a new group where a tensor would overflow the current one
    assert [t for g in groups for t in g] == tensors


@pytest.mark.parametrize("total_gb, windows, limit_gb", [(32, False, 28), (64, False, 57.6), (8, False, 4), (32, True, 12.8)])
def test_default_budget_follows_comfyui(total_gb, windows, limit_gb):
    assert pinned.default_limit(int(total_gb * pinned.GB), windows) == pytest.approx(limit_gb * pinned.GB, rel=1e-6)


def test_budget_can_be_set_from_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("LENS_PINNED_MEMORY_GB", "1.5")
    assert pinned.Ledger.for_this_machine().limit == int(1.5 * pinned.GB)
    monkeypatch.setenv("LENS_PINNED_MEMORY_GB", "lots")
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        assert pinned.Ledger.for_this_machine().limit == pinned.default_limit(pinned._total_ram(), platform.system() == "Windows")
    assert "LENS_PINNED_MEMORY_GB='lots' is not a number of gigabytes" in caplog.text


def test_inside_comfyui_the_pack_counts_in_comfyuis_own_budget(cudart, monkeypatch, caplog):
    bridge = __import__(import_pack().__name__ + ".nodes.comfy_bridge", fromlist=["x"])

    class Management:
        MAX_PINNED_MEMORY = 1 << 20
        TOTAL_PINNED_MEMORY = 1 << 19  # ComfyUI's own pinned weights

    monkeypatch.setattr(pinned, "ledger", bridge.ComfyUIPinnedLedger(Management))
    monkeypatch.setattr(pinned.PinnedGroup, "_refusal_logged", False)
    group = pinned.PinnedGroup([torch.ones(1000)])
    assert group.pinned and Management.TOTAL_PINNED_MEMORY == (1 << 19) + 4096
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        too_big = pinned.PinnedGroup([torch.ones(1 << 17)])  # 512 KB more than the budget's room
    assert not too_big.pinned and "budget is used up" in caplog.text
    del group, too_big
    gc.collect()
    assert Management.TOTAL_PINNED_MEMORY == 1 << 19
    Management.MAX_PINNED_MEMORY = -1  # ComfyUI's --disable-pinned-memory
    assert not pinned.PinnedGroup([torch.ones(10)]).pinned


def test_move_while_used_keeps_the_copy_for_the_way_back(cudart):
    managed_module = __import__(import_pack().__name__ + ".nodes.managed", fromlist=["x"])
    dit = demo_dit()
    before = dit(*dit_inputs())
    managed = managed_module.Managed(dit, device=META, keep_loaded=False)
    with managed.use() as model:
        assert model.device == META
    assert dit.device.type == "cpu" and torch.equal(dit(*dit_inputs()), before)
    assert host_copies_of(dit).nbytes > 0
