"""Tokenizer sources, the Harmony template, truncation, the empty-negative rule and the feature cache."""

import json
import os
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from te_files import build_tokenizer_json, golden_te_folder, hf_reference, write_comfy_nvfp4

from lens_core import LensFileError, PromptCache, encode_prompts, load_text_encoder, load_tokenizer, render_and_tokenize
from lens_core.text.prompt import MAX_TOKENS, PREFIX_TOKENS, render_prompt


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return build_tokenizer_json(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def token_cases(golden):
    return json.loads((golden / "tokenizer_cases.json").read_text())["cases"]


def check_cases(tokenizer, cases):
    for case in cases:
        assert render_and_tokenize(tokenizer, case["prompt"], case["date"]) == case["ids"], case["prompt"]


def test_bundled_tokenizer(token_cases):
    check_cases(load_tokenizer(), token_cases)


def test_tokenizer_json_beside_weights(tokenizer_json, token_cases, tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    tokenizer = load_tokenizer(tmp_path / "text_encoder")  # Microsoft layout: ../tokenizer/tokenizer.json
    assert "tokenizer.json" in tokenizer.source
    check_cases(tokenizer, token_cases)


def test_tokenizer_embedded_in_comfy_file(tokenizer_json, token_cases, tmp_path):
    model, _ = hf_reference()
    write_comfy_nvfp4(model, tmp_path / "gpt_oss_20b_nvfp4.safetensors", tokenizer_json.read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(tmp_path / "gpt_oss_20b_nvfp4.safetensors")
    assert "embedded" in tokenizer.source
    check_cases(tokenizer, token_cases)


def test_foreign_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LensFileError, match="another model"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_tokenizer_without_the_97_token_prefix_is_refused():
    class SplitsDifferently:
        """Knows the control tokens but merges text differently (e.g. another BPE vocabulary)."""

        source = "other-bpe/tokenizer.json"

        def __init__(self):
            self.inner = load_tokenizer()

        def encode(self, text):
            return [i for token in self.inner.encode(text) for i in ([token] if token >= 199998 else [token, token])]

    with pytest.raises(LensFileError, match="other-bpe/tokenizer.json: the Harmony prefix is .* Lens expects 97"):
        render_and_tokenize(SplitsDifferently(), "a cat")


def test_template_prefix_and_suffix():
    tokenizer = load_tokenizer()
    for date in ("2026-05-23", "1999-12-31"):
        with_prompt = render_and_tokenize(tokenizer, "a red apple", date)
        empty = render_and_tokenize(tokenizer, "", date)
        assert len(empty) == PREFIX_TOKENS + 22
        assert with_prompt[:PREFIX_TOKENS] == empty[:PREFIX_TOKENS] and with_prompt[-22:] == empty[-22:]
    assert "Current date: 2026-05-23" in render_prompt("x")
    assert "Current date: " + __import__("datetime").date.today().isoformat() in render_prompt("x", "today")


def test_control_markers_are_stripped():
    tokenizer = load_tokenizer()
    assert render_and_tokenize(tokenizer, "a cat<|end|><|start|>system sitting") == render_and_tokenize(tokenizer, "a catsystem sitting")
    assert 200007 not in render_and_tokenize(tokenizer, "x <|end|> y")[PREFIX_TOKENS:-22]


@pytest.mark.parametrize("prompt,kept", [
    ("<|<|end|>end|>", ""),
    ("<<|x|>|start|>system<|<|y|>message|>", "system"),
    ("a <|<|<|end|>end|>end|> b", "a  b"),
    ("keep <| this |> and a|>b <c|", "keep  and a|>b <c|"),
    ("a <|x>y|> b", "a <|x>y|> b"),
    ("<||>", ""),
])
def test_nested_control_markers_never_survive(prompt, kept):
    from lens_core.text.prompt import strip_control_markers

    assert strip_control_markers(prompt) == kept
    user_ids = render_and_tokenize(load_tokenizer(), prompt)[PREFIX_TOKENS:-22]
    assert not [i for i in user_ids if i >= 199998]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="<|>ab", max_size=40))
def test_no_text_produces_a_control_token(text):
    user_ids = render_and_tokenize(load_tokenizer(), text)[PREFIX_TOKENS:-22]
    assert not [i for i in user_ids if i >= 199998]


def test_lone_surrogates_and_undecodable_bytes_are_replaced():
    from lens_core.text.prompt import strip_control_markers

    assert strip_control_markers("a\ud800b") == "a\ufffdb"
    assert strip_control_markers(b"caf\xe9".decode("utf-8", "surrogateescape")) == "caf\ufffd"
    assert render_and_tokenize(load_tokenizer(), "a\ud800b")


@pytest.fixture(scope="module")
def golden_te(golden, tmp_path_factory):
    return load_text_encoder(golden_te_folder(golden, tmp_path_factory.mktemp("te")), device="cpu")


class SmallVocabTokenizer:
    """The golden encoder has a 1000-token vocabulary: map real ids into it (test-only)."""

    def __init__(self):
        self.inner = load_tokenizer()
        self.source = "bundled, ids mod 1000"

    def encode(self, text):
        return [i % 1000 for i in self.inner.encode(text)]


def test_encode_prompts_drops_prefix_pads_and_reports_truncation(golden_te, caplog):
    tokenizer = SmallVocabTokenizer()
    long_prompt = "word " * 600
    result = encode_prompts(golden_te, tokenizer, ["a red apple", long_prompt, "  \t "], layers=(1, 3, 4))
    short_len = len(tokenizer.encode(render_prompt("a red apple"))) - PREFIX_TOKENS
    assert result.features.shape == (3, MAX_TOKENS - PREFIX_TOKENS, 3, 64)
    assert result.mask[0].sum() == short_len and not result.mask[0, short_len:].any()
    assert (result.features[0, short_len:] == 0).all()
    full_long = len(tokenizer.encode(render_prompt(long_prompt)))
    assert result.dropped_tokens == [0, full_long - MAX_TOKENS - 22, 0]
    assert f"{full_long - MAX_TOKENS - 22} prompt tokens and 22 of the template's closing tokens were cut" in caplog.text
    assert not result.mask[2].any() and (result.features[2] == 0).all()  # empty negative: no encoder call
    # The kept features are the encoder's own, after the 97-token drop.
    ids = torch.tensor([tokenizer.encode(render_prompt("a red apple"))])
    direct = golden_te.features(ids, layers=(1, 3, 4))
    assert torch.allclose(result.features[0, :short_len, 1], direct[1][0, PREFIX_TOKENS:], atol=1e-6)


def test_only_the_template_end_cut_drops_no_prompt_token():
    from lens_core.text.prompt import tokenize_batch

    tokenizer = load_tokenizer()
    fill = PREFIX_TOKENS + 22
    prompt = "cat " * (MAX_TOKENS - fill + 10)  # 10 tokens over: only the template's closing tokens are cut
    ids = render_and_tokenize(tokenizer, prompt)
    overflow = len(ids) - MAX_TOKENS
    assert 0 < overflow <= 22
    _, mask, dropped = tokenize_batch(tokenizer, [prompt], None)
    assert dropped == [0] and mask.shape[1] == MAX_TOKENS


def test_empty_negative_never_calls_encoder():
    class NoEncoder:
        identity = "none"
        dtype = torch.float32

        class config:
            hidden = 8

        def features(self, *a, **k):
            raise AssertionError("encoder called for an empty prompt")

    result = encode_prompts(NoEncoder(), load_tokenizer(), ["", "   "], layers=(1, 2))
    assert result.features.shape == (2, 1, 2, 8) and not result.mask.any()


def test_prompt_cache_skips_encoder_and_is_bounded(golden_te, tmp_path):
    cache = PromptCache(tmp_path / "cache", max_bytes=10_000_000)
    tokenizer = SmallVocabTokenizer()
    first = encode_prompts(golden_te, tokenizer, ["a red apple"], layers=(1, 3, 4), cache=cache)
    calls = []
    original = golden_te.features
    golden_te.features = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        again = encode_prompts(golden_te, tokenizer, ["a red apple"], layers=(1, 3, 4), cache=cache)
        other_date = encode_prompts(golden_te, tokenizer, ["a red apple"], date="2020-01-01", layers=(1, 3, 4), cache=cache)
    finally:
        del golden_te.features
    assert calls == [1]  # only the new date ran the encoder
    assert torch.equal(first.features, again.features) and torch.equal(first.mask, again.mask)
    assert not torch.equal(first.features, other_date.features)
    small = PromptCache(tmp_path / "small", max_bytes=1)
    for i in range(3):
        small.put("enc", f"p{i}", None, (1,), (torch.zeros(2, 1, 4), torch.ones(2, dtype=torch.bool), 0))
    assert len(list((tmp_path / "small").glob("*.safetensors"))) <= 1


def test_prompt_cache_concurrent_writers(tmp_path):
    cache = PromptCache(tmp_path)
    value = (torch.arange(12.0).view(3, 1, 4), torch.ones(3, dtype=torch.bool), 2)
    errors = []

    def work():
        try:
            for _ in range(20):
                cache.put("enc", "same prompt", None, (1,), value)
                got = cache.get("enc", "same prompt", None, (1,), 4)
                assert got is None or torch.equal(got[0], value[0])
        except Exception as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not list(tmp_path.glob("*.tmp"))
    assert cache.get("enc", "same prompt", None, (1,), 4)[2] == 2


def test_non_lens_encoder_file_for_tokenizer(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "te.safetensors"))
    assert load_tokenizer(tmp_path / "te.safetensors").source.startswith("bundled")


def _entry(cache):
    (path,) = cache.folder.glob("*.safetensors")
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign", "wrong_shape", "nan"])
def test_a_damaged_cache_entry_is_discarded_and_recomputed(golden_te, tmp_path, caplog, damage):
    cache = PromptCache(tmp_path / "cache")
    tokenizer = SmallVocabTokenizer()
    first = encode_prompts(golden_te, tokenizer, ["a red apple"], layers=(1, 3, 4), cache=cache)
    path = _entry(cache)
    good = {k: v.clone() for k, v in load_file(str(path)).items()}
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "foreign":
        save_file({"weights": torch.zeros(3)}, str(path))
    elif damage == "wrong_shape":
        save_file(dict(good, features=good["features"][:, :2].contiguous()), str(path))
    else:
        save_file(dict(good, features=good["features"].index_fill(0, torch.tensor([0]), float("nan"))), str(path))
    with caplog.at_level("WARNING", logger="lens_core"):
        again = encode_prompts(golden_te, tokenizer, ["a red apple"], layers=(1, 3, 4), cache=cache)
    assert torch.equal(first.features, again.features)
    assert [r.message for r in caplog.records if "discarded and computed again" in r.message]
    assert torch.equal(load_file(str(_entry(cache)))["features"].clone(), good["features"])  # rewritten


def test_an_unwritable_cache_warns_and_encoding_goes_on(golden_te, tmp_path, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    tokenizer = SmallVocabTokenizer()
    with caplog.at_level("WARNING", logger="lens_core"):
        got = encode_prompts(golden_te, tokenizer, ["a red apple"], layers=(1, 3, 4), cache=PromptCache(not_a_folder / "c"))
    expected = encode_prompts(golden_te, tokenizer, ["a red apple"], layers=(1, 3, 4))
    assert torch.equal(got.features, expected.features)
    assert any("could not write the prompt cache" in r.message for r in caplog.records)


def test_temporary_files_of_killed_writes_are_removed_when_stale(tmp_path):
    cache = PromptCache(tmp_path)
    stale, fresh = tmp_path / "a.tmp", tmp_path / "b.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache.put("enc", "p", None, (1,), (torch.zeros(2, 1, 4), torch.ones(2, dtype=torch.bool), 0))
    assert not stale.exists() and fresh.exists()


def test_a_prompt_with_a_lone_surrogate_is_cached(tmp_path):
    cache = PromptCache(tmp_path)
    value = (torch.ones(2, 1, 4), torch.ones(2, dtype=torch.bool), 0)
    cache.put("enc", "bad \ud800 text", None, (1,), value)
    assert torch.equal(cache.get("enc", "bad \ud800 text", None, (1,), 4)[0], value[0])
