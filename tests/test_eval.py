"""eval.py: perplexity against an independent cross-entropy computation, both protocols."""
import math

import pytest
import torch
import torch.nn.functional as F

from physkern.eval import perplexity, plan_windows


def independent_nll(model, tokens, window, stride):
    """Plain cross-entropy, written without physkern: score token t once, with the context of
    the first window (in order) that contains t and starts before it, counting as in HF docs."""
    n = tokens.numel()
    total, count, prev_end, begin = 0.0, 0, 0, 0
    while True:
        end = min(begin + window, n)
        trg_len = end - prev_end
        ids = tokens[begin:end][None]
        labels = ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(ids).logits
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        loss = F.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
        total += float(loss)
        count += int(mask.sum())
        prev_end = end
        if end == n:
            break
        begin += stride
    return total, count


@pytest.mark.parametrize("n,window,stride", [(100, 32, None), (100, 32, 32), (100, 32, 8),
                                             (97, 20, 7), (64, 64, None), (33, 16, 16)])
def test_matches_independent_cross_entropy(tiny_gpt2, n, window, stride):
    tokens = torch.randint(0, 96, (n,))
    res = perplexity(tiny_gpt2, tokens, window, stride, batch_size=3, progress=False)
    total, count = independent_nll(tiny_gpt2, tokens, window, stride or window)
    assert res.tokens_scored == count
    assert math.isclose(res.mean_nll, total / count, rel_tol=1e-5)
    assert math.isclose(res.perplexity, math.exp(total / count), rel_tol=1e-5)


def test_stride_equal_window_is_non_overlapping(tiny_llama):
    tokens = torch.randint(0, 96, (150,))
    a = perplexity(tiny_llama, tokens, 40, None, progress=False)
    b = perplexity(tiny_llama, tokens, 40, 40, progress=False)
    assert a.perplexity == b.perplexity and a.tokens_scored == b.tokens_scored
    assert a.protocol == b.protocol == "non-overlapping"
    # non-overlapping windows do not score the first token of each window
    assert a.tokens_scored == 150 - math.ceil(150 / 40)


@pytest.mark.parametrize("n,window,stride", [(100, 32, 8), (101, 17, 5), (50, 50, 1)])
def test_sliding_scores_every_token_once(n, window, stride):
    plans = plan_windows(n, window, stride)
    scored = [t for p in plans for t in range(p.score_from, p.end)]
    assert scored == list(range(1, n))
    assert all(p.end - p.begin <= window and p.score_from > p.begin for p in plans)


def test_result_fields(tiny_gpt2, tmp_path):
    import json
    res = perplexity(tiny_gpt2, torch.randint(0, 96, (80,)), 32, 16, progress=False,
                     model_name="tiny", corpus_name="rand")
    res.write_json(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    for key in ("model", "corpus", "tokens_scored", "protocol", "window", "stride", "dtype",
                "device", "versions", "seconds", "tokens_per_second", "perplexity"):
        assert key in d
    assert d["protocol"] == "sliding" and d["stride"] == 16 and d["versions"]["torch"]


def test_bad_arguments(tiny_gpt2):
    t = torch.randint(0, 96, (50,))
    with pytest.raises(ValueError, match="stride must be positive"):
        perplexity(tiny_gpt2, t, 16, 0, progress=False)
    with pytest.raises(ValueError, match="must not exceed window"):
        perplexity(tiny_gpt2, t, 16, 32, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(tiny_gpt2, t[None], 16, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(tiny_gpt2, t[:1], 16, progress=False)


@pytest.mark.parametrize("n,window,prefix", [(160, 32, 64), (150, 40, 40), (97, 16, 96)])
def test_prefix_perplexity_equals_the_shorter_run(tiny_llama, n, window, prefix):
    """The leading windows' figure, derived from a longer run's per-window NLLs, equals an
    independent cross-entropy over the first `prefix` tokens alone."""
    from physkern.eval import prefix_perplexity
    tokens = torch.randint(0, 96, (n,))
    long = perplexity(tiny_llama, tokens, window, None, progress=False)
    pre = prefix_perplexity(long, prefix)
    total, count = independent_nll(tiny_llama, tokens[:prefix], window, window)
    assert pre["tokens_scored"] == count and pre["windows"] == prefix // window
    assert math.isclose(pre["mean_nll"], total / count, rel_tol=1e-5)
    assert math.isclose(pre["perplexity"], math.exp(total / count), rel_tol=1e-5)
    assert len(long.extra["window_nll"]) == long.windows


def test_prefix_perplexity_refuses_what_it_cannot_derive(tiny_llama):
    from physkern.eval import prefix_perplexity
    tokens = torch.randint(0, 96, (128,))
    res = perplexity(tiny_llama, tokens, 32, None, progress=False)
    assert prefix_perplexity(res, 48) is None      # not a multiple of the window
    assert prefix_perplexity(res, 128) is None     # not shorter than the run
    sliding = perplexity(tiny_llama, tokens, 32, 16, progress=False)
    assert prefix_perplexity(sliding, 64) is None  # sliding windows: not the same windows
