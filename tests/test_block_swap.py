"""Block swap: blocks kept in CPU memory and streamed to the compute device give the same outputs."""

import pytest
import torch
from model_files import TINY_DIT, random_dit_state, write_single

from lens_core import LensDiT, LensInputError, apply_loras, load_dit
from lens_core.demo import DEMO_DIT
from lens_core.dit.block_swap import auto_blocks_on_cpu

META = torch.device("meta")


def inputs():
    torch.manual_seed(2)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return torch.randn(2, 12, 128), torch.tensor([0.9, 0.4]), torch.randn(2, 5, 4, 48) * mask[..., None, None], mask, (3, 4)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    cfg = TINY_DIT.__class__(**{**TINY_DIT.__dict__, "blocks": 4})
    return write_single(random_dit_state(cfg, seed=3), tmp_path_factory.mktemp("swap") / "dit.safetensors", dtype=torch.float32)


@pytest.mark.parametrize("count", [1, 3])
def test_swapped_blocks_give_the_same_output(dit_file, count):
    reference = load_dit(dit_file, device="cpu", dtype=torch.float32)
    swapped = load_dit(dit_file, device="cpu", dtype=torch.float32)
    swapped.swap_blocks(count)
    assert swapped.block_swap.indices == list(range(4 - count, 4))
    assert torch.equal(swapped(*inputs()), reference(*inputs()))
    swapped.swap_blocks(0)
    assert swapped.block_swap is None and torch.equal(swapped(*inputs()), reference(*inputs()))


def test_swapped_blocks_with_loras(dit_file, tmp_path):
    from safetensors.torch import save_file

    lora = {f"diffusion_model.transformer_blocks.{i}.img_mlp.w1.lora_{p}.weight": torch.randn(s) * 0.1
            for i in (0, 3) for p, s in (("down", (4, 128)), ("up", (341, 4)))}
    save_file(lora, str(tmp_path / "l.safetensors"))
    plain = apply_loras(load_dit(dit_file, device="cpu", dtype=torch.float32), [(tmp_path / "l.safetensors", 0.7)])
    base = load_dit(dit_file, device="cpu", dtype=torch.float32)
    base.swap_blocks(2)
    assert torch.equal(apply_loras(base, [(tmp_path / "l.safetensors", 0.7)])(*inputs()), plain(*inputs()))


def test_swapped_blocks_stay_on_the_cpu_and_stream_to_the_compute_device():
    """The compute device here is `meta` (it fails on a CPU tensor as CUDA does): the swapped blocks' weights
    stay on the CPU through a move of the model, and every forward streams them over. A plain `.to()` moves them
    too (then nothing streams) and the forward still runs."""
    with META:
        dit = LensDiT(DEMO_DIT)
    for block in dit.transformer_blocks:
        block.to_empty(device="cpu")
    dit.swap_blocks(1)
    for index, block in enumerate(dit.transformer_blocks):
        if index != 1:
            block.to_empty(device=META)
    dit.place(META)
    assert dit.device == META and next(dit.transformer_blocks[1].parameters()).device.type == "cpu"
    features = torch.randn(1, 4, DEMO_DIT.text_layers, DEMO_DIT.text_width)
    out = dit(torch.randn(1, 6, 128), torch.rand(1), features, None, (2, 3))
    assert out.device == META and next(dit.transformer_blocks[1].parameters()).device.type == "cpu"
    dit.to(META)
    assert all(t.device == META for t in dit.parameters())
    assert dit(torch.randn(1, 6, 128), torch.rand(1), features, None, (2, 3)).device == META


def test_block_counts():
    with pytest.raises(LensInputError, match="between 0 and 1"):
        LensDiT(DEMO_DIT).swap_blocks(2)
    gb = 1 << 30
    assert auto_blocks_on_cpu(8 * gb, gb // 8, 48, free_bytes=24 * gb) == 0
    assert auto_blocks_on_cpu(8 * gb, gb // 8, 48, free_bytes=8 * gb) == 32  # 4 GB short at 1/8 GB a block
    assert auto_blocks_on_cpu(8 * gb, gb // 8, 48, free_bytes=gb) == 47


class RecordingStream:
    """A CUDA stream as BlockSwap uses it, recording into `events`: who waits for whom."""

    def __init__(self, name, events):
        self.name, self.events, self.device = name, events, META

    def wait_stream(self, other):
        self.events.append(f"{self.name} waits for {other.name}")


def test_swapped_blocks_are_copied_one_swapped_block_ahead_on_the_side_stream(monkeypatch):
    """The stream logic that a CPU run skips (there a copy is an identity), recorded: each copy runs on the side
    stream after the compute stream's earlier work, the next swapped block's copy starts before the current one
    runs, and the compute stream waits for a block's copy (and marks its memory as used there) before running it."""
    from contextlib import contextmanager

    from lens_core.dit.block_swap import BlockSwap

    events = []
    compute, side = RecordingStream("compute", events), RecordingStream("side", events)

    @contextmanager
    def on_stream(stream):
        events.append(f"copy on {stream.name}")
        yield

    monkeypatch.setattr(BlockSwap, "_side_stream", lambda self, device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    recorded = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: recorded.append((tensor.device, stream.name)))
    cfg = DEMO_DIT.__class__(**{**DEMO_DIT.__dict__, "blocks": 4})
    dit = LensDiT(cfg)
    dit.swap_blocks(2)
    dit.place(META)
    for index, block in enumerate(dit.transformer_blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: events.append(f"run {index}"))
    features = torch.randn(1, 4, cfg.text_layers, cfg.text_width)
    out = dit(torch.randn(1, 6, 128), torch.rand(1), features, None, (2, 3))
    assert out.device == META  # the swapped blocks ran with copies of their weights on the compute device
    assert events == ["side waits for compute", "copy on side", "run 0", "run 1",
                      "side waits for compute", "copy on side", "compute waits for side", "run 2",
                      "compute waits for side", "run 3"]
    per_block = len([*dit.transformer_blocks[2].parameters(), *dit.transformer_blocks[2].buffers()])
    assert recorded == [(META, "compute")] * (2 * per_block)


def test_at_most_one_swapped_blocks_copy_waits_ahead_of_the_running_one(monkeypatch):
    """When the next swapped block's copy is made, the only other copy alive is the running block's: the previous block's
    copy is gone (170 MB of GPU memory per block at the real size; the loop used to keep it, three copies at the peak)."""
    import weakref

    from lens_core.dit.block_swap import BlockSwap

    copies, alive_at_fetch = [], []
    fetch = BlockSwap._fetch

    def recording_fetch(self, block, device):
        alive_at_fetch.append(sum(1 for refs in copies if any(ref() is not None for ref in refs)))
        weights, stream = fetch(self, block, device)
        copies.append([weakref.ref(t) for t in weights.values()])
        return weights, stream

    monkeypatch.setattr(BlockSwap, "_fetch", recording_fetch)
    cfg = DEMO_DIT.__class__(**{**DEMO_DIT.__dict__, "blocks": 5})
    with META:  # the compute device: a copy there is a new tensor (on the CPU, .to("cpu") would return the weight itself)
        dit = LensDiT(cfg)
    for block in dit.transformer_blocks[1:]:
        block.to_empty(device="cpu")
    dit.swap_blocks(4)
    with torch.no_grad():
        dit(torch.randn(1, 6, 128), torch.rand(1), torch.randn(1, 4, cfg.text_layers, cfg.text_width), None, (2, 3))
    assert alive_at_fetch == [0, 1, 1, 1]  # each new copy is made beside the running block's copy only
