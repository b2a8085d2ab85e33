"""Page-locked copies are cut from slabs at aligned offsets, a slab is no larger than needed and goes back to its
provider when its last copy is gone; the budget holds; inside ComfyUI, ComfyUI's own functions lock the pages.

Without a GPU the provider is a recording stand-in (the `pinning` fixture): what is checked is which buffers are
handed out, how large, and that each is given back exactly once, when nothing uses it any more.
"""

import gc
import logging
import platform

import pytest
import torch
from cuda_stand_in import RecordingPinnedMemory
from torch import nn

from lens_core.memory import pinned
from lens_core.memory.pinned import ALIGNMENT, Pool, footprint


def example_tensors():
    return [torch.randn(3, 5).bfloat16(), torch.arange(7, dtype=torch.uint8), torch.tensor(2.5),
            torch.randn(4, 4).to(torch.float8_e4m3fn), torch.zeros(0, 3), torch.tensor([True, False, True])]


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_copies_share_one_slab_of_their_size_at_aligned_offsets(pinning):
    tensors = example_tensors()
    pool = Pool(tensors)
    copies = [pool.empty_like(t) for t in tensors]
    for original, copy in zip(tensors, copies):
        copy.copy_(original)
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy.reshape(-1).view(torch.uint8), original.reshape(-1).view(torch.uint8))  # bit for bit
    [(start, size)] = pinning.allocated.items()
    assert size == sum(map(footprint, tensors)) < nbytes(tensors) + len(tensors) * ALIGNMENT
    assert all(pinning.holds(c) and (c.data_ptr() - start) % ALIGNMENT == 0 for c in copies if c.numel())


def test_slabs_are_at_most_slab_bytes_and_a_larger_tensor_gets_its_own(pinning, monkeypatch):
    monkeypatch.setattr(pinned, "SLAB_BYTES", 4 * ALIGNMENT)
    tensors = [torch.zeros(ALIGNMENT, dtype=torch.uint8) for _ in range(6)] + [torch.zeros(9 * ALIGNMENT, dtype=torch.uint8)]
    pool = Pool(tensors)
    copies = [pool.empty_like(t) for t in tensors]
    assert sorted(pinning.allocated.values()) == [4 * ALIGNMENT, 4 * ALIGNMENT, 9 * ALIGNMENT]
    assert all(pinning.holds(c) for c in copies)


def test_a_slab_goes_back_when_its_last_copy_is_gone(pinning):
    tensors = example_tensors()
    pool = Pool(tensors)
    copies = [pool.empty_like(t) for t in tensors]
    [start] = pinning.allocated
    last = copies.pop()
    del pool, copies
    gc.collect()
    assert pinning.freed == []  # one copy still uses it
    del last
    gc.collect()
    assert pinning.freed == [start] and pinning.allocated == {}


def test_past_the_budget_the_rest_stays_ordinary_and_it_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(pinned, "provider", RecordingPinnedMemory(limit=2 * ALIGNMENT + 256))
    monkeypatch.setattr(pinned, "SLAB_BYTES", 2 * ALIGNMENT)  # a slab is the unit the budget grants or refuses
    monkeypatch.setattr(pinned, "_refusal_logged", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tensors = [torch.zeros(ALIGNMENT, dtype=torch.uint8) for _ in range(4)]
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        first = Pool(tensors)
        assert [first.empty_like(t) is not None for t in tensors] == [True, True, False, False]
        assert Pool(tensors[:1]).empty_like(tensors[0]) is None
    assert sum("no more page-locked memory" in r.getMessage() for r in caplog.records) == 1


def test_without_cuda_pytorchs_provider_hands_out_nothing():
    provider = pinned.TorchPinnedMemory(1 << 30)
    assert provider.allocate(4096) is None and provider.used == 0


class StandInComfyUIManagement:
    """comfy.model_management's pin_memory / unpin_memory as ComfyUI has them: it registers a CPU tensor in place, only
    parameter-typed, contiguous, not yet registered ones, within its budget, and keeps its own running total."""

    def __init__(self, budget: int):
        self.budget, self.registered, self.calls = budget, {}, []

    def pin_memory(self, tensor) -> bool:
        if type(tensor).__name__ != "Parameter" or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return False
        size = tensor.numel() * tensor.element_size()
        if tensor.data_ptr() in self.registered or sum(self.registered.values()) + size > self.budget:
            return False
        self.registered[tensor.data_ptr()] = size
        self.calls.append("pin")
        return True

    def unpin_memory(self, tensor) -> bool:
        self.calls.append("unpin")
        return self.registered.pop(tensor.data_ptr(), None) is not None


def test_inside_comfyui_its_own_functions_lock_the_pages_and_unlock_them_after_the_copies(monkeypatch):
    management = StandInComfyUIManagement(budget=1 << 20)
    monkeypatch.setattr(pinned, "provider", pinned.ComfyUIPinnedMemory(management))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: management.calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    state = dict(vars(management))
    copy = Pool([torch.ones(1000)]).empty_like(torch.ones(1000))
    assert copy is not None and list(management.registered.values()) == [4096]
    assert Pool([torch.ones(1 << 19)]).empty_like(torch.ones(1 << 19)) is None  # past ComfyUI's budget: ComfyUI says no
    del copy
    gc.collect()
    assert management.calls == ["pin", "synchronize", "unpin"] and management.registered == {}
    assert vars(management).keys() == state.keys()  # the pack set none of ComfyUI's globals


def test_comfyuis_page_locking_takes_the_slab_as_a_parameter():
    class Recording:
        def pin_memory(self, tensor):
            self.got = tensor
            return True

    management = Recording()
    buffer = pinned.ComfyUIPinnedMemory(management).allocate(4096)
    assert isinstance(management.got, nn.Parameter) and buffer is management.got and not buffer.requires_grad


@pytest.mark.parametrize("total_gb, windows, limit_gb", [(32, False, 28), (64, False, 57.6), (8, False, 4), (32, True, 12.8)])
def test_default_budget_follows_comfyui(total_gb, windows, limit_gb):
    assert pinned.default_limit(int(total_gb * pinned.GB), windows) == pytest.approx(limit_gb * pinned.GB, rel=1e-6)


def test_budget_can_be_set_from_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("LENS_PINNED_MEMORY_GB", "1.5")
    assert pinned.limit_for_this_machine() == int(1.5 * pinned.GB)
    monkeypatch.setenv("LENS_PINNED_MEMORY_GB", "lots")
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        assert pinned.limit_for_this_machine() == pinned.default_limit(pinned._total_ram(), platform.system() == "Windows")
    assert "LENS_PINNED_MEMORY_GB='lots' is not a number of gigabytes" in caplog.text
