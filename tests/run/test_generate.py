"""Generation: the KV-cached loop equals recomputing the whole sequence, streaming text decodes
whole characters, switches apply through moelab.steer, bad input gets clear errors."""

import pytest
import torch
from click.testing import CliRunner

from moelab.cli import main
from moelab.cli.generate import LayerExperts, install_switches
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.run.generate import (
    GenerationConfig,
    TextStream,
    context_length,
    generate,
    iter_generate,
    iter_token_ids,
)
from moelab.steer import experts_off


class ByteTokenizer:
    """One token per UTF-8 byte (vocab 256): multi-byte characters span several tokens."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=False):
        return self._Enc(list(text.encode("utf-8")))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


FAMILIES = ["Mixtral", "DeepSeek-V3", "Qwen3-MoE"]


def _model(family, **kw):
    return tiny_model(family, vocab_size=256, **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_full_recompute(family, temperature):
    model = _model(family)
    prompt = [5, 17, 200, 3, 99]
    cfg = dict(max_new_tokens=12, temperature=temperature, top_p=0.9, seed=7, stop_at_eos=False)
    cached = list(iter_token_ids(model, prompt, GenerationConfig(**cfg)))
    full = list(iter_token_ids(model, prompt, GenerationConfig(**cfg, use_cache=False)))
    assert len(cached) == 12 and cached == full


def test_greedy_is_the_argmax_of_the_full_forward():
    model = _model("Mixtral")
    ids = [1, 2, 3]
    out = list(iter_token_ids(model, ids, GenerationConfig(max_new_tokens=4, stop_at_eos=False)))
    seq = list(ids)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out == seq[3:]


def test_text_stream_emits_whole_characters():
    tok = ByteTokenizer()
    text = "héllo → 世界 🎉 done"
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in tok.encode(text).ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # the bytes of a split character waited


def test_generate_result_and_streaming_callback():
    model = _model("Qwen3-MoE")
    seen = []
    r = generate(model, ByteTokenizer(), "ab", GenerationConfig(max_new_tokens=6, stop_at_eos=False),
                 on_text=seen.append)
    assert r.prompt_ids == [97, 98] and len(r.token_ids) == 6 and r.stop_reason == "length"
    assert "".join(seen) == r.text == ByteTokenizer().decode(r.token_ids)
    assert r.tokens_per_s > 0 and r.seconds >= r.first_token_s > 0


def test_stops_at_eos_and_at_the_context():
    model = _model("Qwen3-MoE", max_position_embeddings=16)
    first = list(iter_token_ids(model, [1, 2], GenerationConfig(max_new_tokens=1)))[0]
    model.config.eos_token_id = first
    r = generate(model, ByteTokenizer(), "\x01\x02", GenerationConfig(max_new_tokens=5))
    assert r.token_ids == [first] and r.stop_reason == "eos"
    model.config.eos_token_id = None
    r = generate(model, ByteTokenizer(), "0123456789", GenerationConfig(max_new_tokens=50))
    assert len(r.token_ids) == 6 and r.stop_reason == "context"


def test_prompt_longer_than_the_context_is_a_clear_error():
    model = _model("Qwen3-MoE", max_position_embeddings=16)
    assert context_length(model) == 16
    view = open_model(model)
    handle = experts_off(view, {1: [0]})
    with pytest.raises(MoelabError, match=r"--prompt.*16 tokens.*context is 16 tokens"):
        generate(model, ByteTokenizer(), "x" * 16, handles=[handle])
    assert handle._removed  # the edit installed for this generation is gone
    with pytest.raises(MoelabError, match="--prompt"):
        iter_generate(model, ByteTokenizer(), "y" * 40, GenerationConfig())


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0),
                                 dict(top_p=1.5), dict(seed="a")])
def test_config_is_validated(bad):
    with pytest.raises(MoelabError):
        GenerationConfig(**bad)


def test_layer_experts_parses_and_rejects():
    assert LayerExperts().convert("1:3, 1:0,2:5", None, None) == {1: [3, 0], 2: [5]}
    for bad in ("1", "a:b", "1:2:3", "1:"):
        with pytest.raises(Exception, match="LAYER:EXPERT"):
            LayerExperts().convert(bad, None, None)


@pytest.mark.parametrize("family", ["Mixtral", "DeepSeek-V3"])
def test_switches_apply_through_the_stock_edits(family):
    model = _model(family)
    view = open_model(model)
    layer = view.blocks[-1].layer
    off = {layer: [0, 1]}
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    prompt = [4, 8, 15, 16]
    with experts_off(view, off):
        expected = list(iter_token_ids(model, prompt, cfg))
    handles = install_switches(view, off, {layer: [2]})
    got_off = list(iter_token_ids(model, prompt, cfg, handles[:1]))
    assert got_off == expected and handles[0].counts[layer]["tokens"] == len(prompt) + 7
    # --on forces expert 2 into every token of that layer
    seen = []
    hook = view.blocks[-1].register_routing_hook(lambda ev: seen.append(ev.ids_TK))
    list(iter_token_ids(model, prompt, cfg, handles[1:]))
    hook.remove()
    assert all((ids == 2).any(-1).all() for ids in seen)
    assert not view.blocks[-1].module._moelab_routing_seam.edits  # every edit removed


def test_switches_out_of_range_name_the_option():
    view = open_model(_model("Mixtral"))
    with pytest.raises(MoelabError, match=r"--off: .*layer 9 is not an MoE layer"):
        install_switches(view, {9: [0]}, None)
    with pytest.raises(MoelabError, match=r"--on: .*expert 99 is not an expert id"):
        install_switches(view, {0: [1]}, {1: [99]})
    assert not view.blocks[0].module._moelab_routing_seam.edits  # the --off edit was undone


def test_cli_streams_and_reports_bad_input(tiny_model_dir):
    runner = CliRunner()
    out = runner.invoke(main, ["generate", str(tiny_model_dir), "--prompt", "def f(", "--max-new-tokens", "5",
                               "--off", "0:1", "--stats"])
    assert out.exit_code == 0, out.output
    assert "5 new tokens" in out.output
    out = runner.invoke(main, ["generate", str(tiny_model_dir), "--prompt", "word " * 80])
    assert out.exit_code == 2 and "--prompt" in out.output and "context is 64 tokens" in out.output
    out = runner.invoke(main, ["generate", str(tiny_model_dir), "--prompt", "a", "--on", "5:0"])
    assert out.exit_code == 2 and "--on: " in out.output and "not an MoE layer" in out.output


def test_empty_prompt_starts_from_bos_and_foreign_tokenizer_is_refused():
    model = _model("Qwen3-MoE")
    model.config.bos_token_id = 7
    r = generate(model, ByteTokenizer(), "", GenerationConfig(max_new_tokens=2, stop_at_eos=False))
    assert r.prompt_ids == [7] and len(r.token_ids) == 2
    small = tiny_model("Qwen3-MoE")  # vocabulary of 64: byte ids above 63 do not exist
    with pytest.raises(MoelabError, match="vocabulary of 64"):
        generate(small, ByteTokenizer(), "hello")


def test_cli_decoding_methods_steering_and_an_expert_budget(tiny_model_dir, tmp_path):
    """--decode scmoe equals scmoe_greedy; --decode rewire, --steer and --expert-budget run and
    report; their bad settings name the option."""
    from moelab.data.tokenizer import load_tokenizer
    from moelab.models import open_model
    from moelab.steer import write_steering
    from moelab.steer.files import SteeringEdit
    from moelab.steer.scmoe import scmoe_greedy

    runner = CliRunner()
    args = ["generate", str(tiny_model_dir), "--prompt", "def f(x):", "--max-new-tokens", "6"]
    out = runner.invoke(main, [*args, "--decode", "scmoe"])
    assert out.exit_code == 0, out.output
    view = open_model(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    prompt = tok.encode("def f(x):", add_special_tokens=False).ids
    want = scmoe_greedy(view, torch.tensor([prompt]), 6)[0, len(prompt):].tolist()
    assert out.output.strip() == tok.decode(want).strip()
    out = runner.invoke(main, [*args, "--decode", "rewire", "--rewire-every", "3", "--stats"])
    assert out.exit_code == 0 and "6 new tokens" in out.output, out.output
    path = tmp_path / "steer.json"
    write_steering(path, view, [SteeringEdit(mode="off", experts={view.blocks[0].layer: (0, 1)})])
    out = runner.invoke(main, [*args, "--steer", str(path)])
    assert out.exit_code == 0, out.output
    out = runner.invoke(main, [*args, "--expert-budget", "50%", "--stats"])
    assert out.exit_code == 0 and "experts: hit rate" in out.output, out.output
    out = runner.invoke(main, [*args, "--decode", "scmoe", "--alpha", "0"])
    assert out.exit_code == 2 and "--decode scmoe: SCMoE: alpha must be in (0, 1]" in out.output
    out = runner.invoke(main, [*args, "--decode", "scmoe", "--rank", "8"])
    assert out.exit_code == 2 and "rank 8 needs more experts" in out.output
    out = runner.invoke(main, [*args, "--expert-budget", "1", "--stats"])
    assert out.exit_code == 2 and "budget" in out.output
