"""Lattice attention inside transformers models, through the AttentionInterface (no patching)."""
import copy

import pytest
import torch

import physkern
from physkern.research.attention import ATTN_NAME, record_work
from physkern.kernels.lattice_attention import lattice_attention_reference

INF = float("inf")


@pytest.fixture(params=["tiny_gpt2", "tiny_llama"])
def model(request):
    # A private copy: enabling lattice changes the config, and the fixtures are session-wide.
    return copy.deepcopy(request.getfixturevalue(request.param))


def _ids(n=40, batch=2):
    return torch.randint(0, 96, (batch, n), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_xi_inf_gives_the_same_logits(model):
    ids = _ids()
    before = model(ids).logits
    impl = model.config._attn_implementation
    physkern.enable_lattice(model, INF)
    assert model.config._attn_implementation == ATTN_NAME
    with record_work() as work:
        after = model(ids).logits
    assert work.calls == model.config.num_hidden_layers  # the lattice function really ran
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    physkern.disable_lattice(model)
    assert model.config._attn_implementation == impl
    assert not hasattr(model.config, "lattice_xi")
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def _layer_qkv_hook(model):
    """Capture q/k/v of the first attention call through a wrapper registered under another
    name: compares the model's lattice output with the reference on the same tensors."""
    from transformers import AttentionInterface
    from physkern.research.attention import lattice_attention_forward
    seen = []

    def spy(module, q, k, v, mask, **kw):
        out = lattice_attention_forward(module, q, k, v, mask, **kw)
        seen.append((q, k, v, kw.get("scaling"), out[0]))
        return out
    AttentionInterface.register("lattice_spy", spy)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionMaskInterface.register("lattice_spy", sdpa_mask)
    return seen


@torch.no_grad()
def test_finite_xi_matches_reference_inside_model(model):
    ids = _ids(30)
    seen = _layer_qkv_hook(model)
    physkern.enable_lattice(model, 4.0)
    model.set_attn_implementation("lattice_spy")
    model(ids)
    assert len(seen) == model.config.num_hidden_layers
    for q, k, v, scale, out in seen:
        ref = lattice_attention_reference(q, k, v, 4.0, scale=scale).transpose(1, 2)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_finite_xi_changes_logits_and_per_head_xi(model):
    ids = _ids()
    base = model(ids).logits
    heads = model.config.num_attention_heads
    physkern.enable_lattice(model, 2.0)
    scalar = model(ids).logits
    assert (scalar - base).abs().max() > 1e-3
    physkern.enable_lattice(model, [2.0] * heads)       # per-head list, all equal: same result
    torch.testing.assert_close(model(ids).logits, scalar)
    physkern.enable_lattice(model, [2.0] + [INF] * (heads - 1))
    mixed = model(ids).logits
    assert (mixed - scalar).abs().max() > 1e-4 and (mixed - base).abs().max() > 1e-4
    physkern.disable_lattice(model)


@torch.no_grad()
def test_skipping_in_model_stays_close(model):
    ids = _ids(60)
    physkern.enable_lattice(model, 1.0)
    exact = model(ids).logits
    physkern.enable_lattice(model, 1.0, eps=1e-4)
    with record_work(block_m=16, block_n=16) as work:
        approx = model(ids).logits
    assert work.fraction_blocks_visited < 1.0
    torch.testing.assert_close(approx, exact, atol=1e-2, rtol=0)


@torch.no_grad()
def test_cached_decoding_matches_full_forward(model):
    ids = _ids(24, batch=1)
    physkern.enable_lattice(model, 6.0)
    full = model(ids).logits
    out = model(ids[:, :20], use_cache=True)
    cache = out.cache  # transformers 5.x name (was past_key_values)
    steps = []
    for t in range(20, 24):
        o = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = o.cache
        steps.append(o.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 20:24], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, full[:, :20], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_mask_uses_masked_path(model):
    ids = _ids(20, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                                      # left padding of the first row
    physkern.enable_lattice(model, 5.0)
    padded = model(ids, attention_mask=mask).logits
    # The unpadded second row equals its own forward without a mask.
    torch.testing.assert_close(padded[1], model(ids[1:]).logits[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(padded[0, 4:]).all()


def test_enable_bad_arguments(model):
    with pytest.raises(ValueError, match="xi must be > 0"):
        physkern.enable_lattice(model, 0.0)
    with pytest.raises(ValueError, match="one value per query head"):
        physkern.enable_lattice(model, [1.0] * (model.config.num_attention_heads + 1))
    with pytest.raises(ValueError, match="eps must lie in"):
        physkern.enable_lattice(model, 4.0, eps=1.5)
    with pytest.raises(ValueError, match="PreTrainedModel"):
        physkern.enable_lattice(torch.nn.Linear(2, 2), 4.0)
    assert model.config._attn_implementation != ATTN_NAME


def test_training_with_dropout_is_refused(model):
    model.train()
    for m in model.modules():
        if hasattr(m, "attn_dropout"):
            m.attn_dropout.p = 0.1
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    physkern.enable_lattice(model, 4.0)
    with pytest.raises(ValueError, match="dropout"):
        model(_ids(8))


# ------------------------------------------------------------------------------------------------
# `physkern sweep xi` end to end on a tiny LLaMA saved to disk
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_tiny_llama(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("sweepxi")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(words[int(i)] for i in torch.randint(0, 6, (50,), generator=gen)) + "."
            for _ in range(10)]
    text = "\n\n".join(docs) + "\n"
    (root / "corpus.txt").write_text(text)
    chars = sorted(set(text))
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True)).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def test_sweep_xi_cli(saved_tiny_llama, capsys):
    import json
    from physkern.cli import main
    root = saved_tiny_llama
    out = root / "xi.json"
    rc = main(["sweep", "xi", "--model", str(root / "model"), "--corpus", str(root / "corpus.txt"),
               "--tokens", "256", "--window", "64", "--xi", "2", "16", "inf", "--json", str(out),
               "--markdown", str(root / "xi.md")])
    assert rc == 0
    d = json.loads(out.read_text())
    assert [p["xi"] for p in d["points"]] == [2.0, 16.0, "inf"]
    for key in ("model", "corpus", "protocol", "lattice", "baseline", "device", "versions",
                "command", "seeds_reference"):
        assert key in d, key
    inf_point = d["points"][-1]
    assert abs(inf_point["perplexity"] - d["baseline"]["perplexity"]) < 1e-3 * d["baseline"][
        "perplexity"]
    assert inf_point["work"]["fraction_blocks_visited"] == 1.0
    for p in d["points"]:
        assert 0 < p["work"]["fraction_blocks_visited"] <= 1.0
        assert p["work"]["oracle_blocks_visited"] <= p["work"]["blocks_visited"]
    assert (root / "xi.png").stat().st_size > 0
    md = (root / "xi.md").read_text()
    assert "theirs" in md and "| inf |" in md


@pytest.mark.parametrize("argv, code", [(["--xi", "0"], 2), (["--xi", "abc"], 2),
                                        (["--eps", "1.5"], 2)])
def test_sweep_xi_bad_arguments(saved_tiny_llama, argv, code, capsys):
    from physkern.cli import main
    root = saved_tiny_llama
    base = ["sweep", "xi", "--model", str(root / "model"), "--corpus", str(root / "corpus.txt"),
            "--tokens", "128", "--window", "64", "--json", str(root / "bad.json")]
    try:
        rc = main(base + argv)
    except SystemExit as exc:  # argparse rejects the value
        rc = exc.code
    assert rc == code
    err = capsys.readouterr().err
    assert ("xi" in err) or ("eps" in err)
