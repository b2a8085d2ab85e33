"""Streamed weights are page-locked at their exact size (one registered buffer per group), and released with it.

Without a GPU, CUDA's host registration is a recording stand-in: what is checked is which memory is registered,
how much, and that it is unregistered exactly once, when its owner lets go (while the memory is still allocated).
"""

import gc
import logging

import torch
from cuda_stand_in import RecordingCudart
from model_files import TINY_DIT, random_dit_state, write_single

from lens_core import load_dit
from lens_core.memory import pinned
from lens_core.memory.pinned import ALIGNMENT, PinnedGroup


def example_tensors():
    return [torch.randn(3, 5).bfloat16(), torch.arange(7, dtype=torch.uint8), torch.tensor(2.5),
            torch.randn(4, 4).to(torch.float8_e4m3fn), torch.zeros(0, 3), torch.tensor([True, False, True])]


def test_copies_pack_into_one_buffer_on_page_boundaries():
    tensors = example_tensors()
    group = PinnedGroup(tensors)
    assert not group.pinned  # no CUDA here: ordinary memory
    start = group.buffer.data_ptr()
    assert start % ALIGNMENT == 0 and group.buffer.numel() % ALIGNMENT == 0  # whole pages: no page shared with others
    for original, copy in zip(tensors, group.tensors):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy.reshape(-1).view(torch.uint8), original.reshape(-1).view(torch.uint8))  # bit for bit
        assert copy.untyped_storage().data_ptr() == group.buffer.untyped_storage().data_ptr()
        assert copy.numel() == 0 or (copy.data_ptr() - start) % ALIGNMENT == 0  # an empty tensor has no address
    exact = sum(t.numel() * t.element_size() for t in tensors)
    assert exact <= group.buffer.numel() < exact + len(tensors) * ALIGNMENT


def test_buffer_is_registered_once_and_unregistered_when_the_group_goes(cudart):
    group = PinnedGroup(example_tensors())
    ptr, size = group.buffer.data_ptr(), group.buffer.numel()
    assert group.pinned and cudart.registered == {ptr: size}
    views = group.tensors
    del group
    gc.collect()
    assert cudart.unregistered == [ptr]
    assert views[0].data_ptr() == ptr  # the memory itself lives on while views use it


def test_a_refused_registration_is_cleared_logged_once_and_never_unregistered(monkeypatch, caplog):
    refusing = RecordingCudart(refuse=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: refusing)
    monkeypatch.setattr(PinnedGroup, "_refusal_logged", False)
    discarded = []
    monkeypatch.setattr(pinned, "_discard_cuda_error", lambda: discarded.append(True))
    with caplog.at_level(logging.WARNING, logger="lens_core"):
        groups = [PinnedGroup([torch.ones(1000)]) for _ in range(2)]
    assert not any(g.pinned for g in groups) and torch.equal(groups[1].tensors[0], torch.ones(1000))
    assert discarded == [True, True]  # each failure's leftover CUDA error is taken at once
    assert [r.getMessage() for r in caplog.records if "page-lock" in r.getMessage()] == [
        "Lens: the GPU driver refused to page-lock 0.00 GB of weights (out of memory); they stay in ordinary memory: "
        "outputs are the same, their copies to the GPU are slower."]
    del groups
    gc.collect()
    assert refusing.unregistered == []


def test_swapped_blocks_each_live_in_one_exact_size_registered_buffer(tmp_path, cudart):
    cfg = TINY_DIT.__class__(**{**TINY_DIT.__dict__, "blocks": 4})
    dit = load_dit(write_single(random_dit_state(cfg, seed=3), tmp_path / "dit.safetensors", dtype=torch.float32),
                   device="cpu", dtype=torch.float32)
    dit.swap_blocks(2)
    assert len(cudart.registered) == 2
    for index, (ptr, size) in zip((2, 3), cudart.registered.items()):
        tensors = [*dit.transformer_blocks[index].parameters()]
        exact = sum(t.numel() * t.element_size() for t in tensors)
        assert exact <= size < exact + len(tensors) * ALIGNMENT
        assert all(ptr <= t.data_ptr() < ptr + size for t in tensors)
    dit.swap_blocks(0)  # the blocks' page-locked copies stay theirs: the model's CPU copy (see host_copies.py)
    gc.collect()
    assert cudart.unregistered == [] and len(cudart.registered) == 2
    del dit, tensors
    gc.collect()
    assert sorted(cudart.unregistered) == sorted(cudart.registered)


def test_streamed_expert_banks_are_registered_per_bank_and_kept_while_the_encoder_is_away(cudart):
    from lens_core.demo import demo_text_encoder

    encoder = demo_text_encoder()
    ids = torch.randint(0, 1000, (1, 9))
    before = encoder.features(ids, layers=(1, 3))
    encoder.set_expert_streaming(True)
    banks = encoder.expert_banks()
    assert len(cudart.registered) == len(banks)
    assert {bank.weights.data_ptr() for bank in banks} == set(cudart.registered)
    assert all(torch.equal(a, b) for a, b in zip(encoder.features(ids, layers=(1, 3)), before))
    encoder.set_expert_streaming(False)
    encoder.move(torch.device("meta"), keep_host_copy=True)  # page-locked copies of the rest too; the banks keep theirs
    encoder.move(torch.device("cpu"))
    assert {bank.weights.data_ptr() for bank in encoder.expert_banks()} <= set(cudart.registered)  # their own, back
    assert all(torch.equal(a, b) for a, b in zip(encoder.features(ids, layers=(1, 3)), before))
    assert cudart.unregistered == []
    del encoder, banks
    gc.collect()
    assert sorted(cudart.unregistered) == sorted(cudart.registered)
