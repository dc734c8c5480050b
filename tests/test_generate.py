"""physkern.generate / `physkern generate`: the timed greedy loop against model.generate.

The conftest models at their default init (std 0.02) are so flat that greedy decoding repeats one
token, which would make "same tokens as model.generate" vacuous; the tests sharpen a copy
(weights x10) so the greedy path wanders over many tokens.
"""
import copy

import pytest
import torch

from physkern.cli import main
from physkern.generate import GenerationResult, generate_timed

PROMPT = [5, 17, 33, 60, 8, 41, 72]


def _sharpened(model, factor: float = 10.0):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(factor)
    return m.eval()


def _quantized(model, config=None):
    from physkern import ScalarConfig, quantize
    m = copy.deepcopy(model)
    quantize(m, config or ScalarConfig(bits=4, group_size=16), progress=False)
    return m


def _reference(model, ids, n, stop_at_eos):
    """model.generate's greedy tokens (an independent loop: transformers' own cache handling)."""
    ids = torch.tensor([ids])
    kw = {} if stop_at_eos else {"min_new_tokens": n}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


def _tokenizer(vocab_size):
    """A word-level tokenizer whose words are w0 .. w{vocab_size-1} (one id each)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("quant", [None, "rtn4", "codebook"])
def test_greedy_matches_model_generate(arch, quant, request):
    from physkern import CodebookConfig
    model = _sharpened(request.getfixturevalue(arch))
    if quant == "rtn4":
        model = _quantized(model)
    elif quant == "codebook":
        model = _quantized(model, CodebookConfig(k=16, block_dim=2, scope="layer",
                                                 calibrate=False, iters=5))
    res = generate_timed(model, None, PROMPT, 24, stop_at_eos=False)
    ref = _reference(model, PROMPT, 24, stop_at_eos=False)
    assert res.token_ids == ref
    assert len(set(ref)) >= 4, "test model too flat: greedy output does not discriminate"
    assert res.prompt_tokens == len(PROMPT) and res.new_tokens == 24
    assert res.decode_steps == 23 and res.prefill_seconds > 0 and res.decode_seconds > 0
    assert res.decode_seconds == pytest.approx(sum(res.decode_step_seconds))
    assert res.decode_tokens_per_second == pytest.approx(23 / res.decode_seconds)


def test_stops_at_eos_like_generate(tiny_llama):
    model = _sharpened(tiny_llama)
    free = generate_timed(model, None, PROMPT, 24, stop_at_eos=False).token_ids
    eos = free[5]  # make a token the model emits at step 6 the EOS: both loops must stop there
    model.generation_config.eos_token_id = eos
    res = generate_timed(model, None, PROMPT, 24)
    assert res.token_ids == _reference(model, PROMPT, 24, stop_at_eos=True)
    assert res.stopped_at_eos and res.token_ids[-1] == eos
    assert res.token_ids == free[:free.index(eos) + 1]


def test_threads_restored_and_warmup(tiny_gpt2):
    model = _sharpened(tiny_gpt2)
    before = torch.get_num_threads()
    res = generate_timed(model, None, torch.tensor([PROMPT]), 4, threads=1, warmup=True,
                         stop_at_eos=False)
    assert res.threads == 1 and torch.get_num_threads() == before
    assert isinstance(res, GenerationResult) and res.to_dict()["decode_steps"] == 3


@pytest.mark.parametrize("kw, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"threads": 0}, "threads"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [3, 4]]}, "batch 1"), ({"max_new_tokens": 100}, "context")])
def test_bad_inputs_raise(tiny_gpt2, kw, match):
    args = {"prompt": PROMPT, "max_new_tokens": 4, **kw}
    tok = _tokenizer(96)
    with pytest.raises(ValueError, match=match):
        generate_timed(tiny_gpt2, tok, args.pop("prompt"), **args)


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory, tiny_llama):
    """tiny LLaMA (sharpened) saved as a transformers dir and as a physkern RTN 4-bit dir."""
    from physkern import save_quantized
    d = tmp_path_factory.mktemp("gen")
    tok = _tokenizer(96)
    fp = _sharpened(tiny_llama)
    fp.save_pretrained(d / "fp")
    tok.save_pretrained(d / "fp")
    q = _quantized(fp)
    save_quantized(q, d / "q", tokenizer=tok)
    return d, tok


@pytest.mark.parametrize("kind", ["fp", "q"])
def test_cli_generate(saved_dirs, kind, capsys):
    from physkern.models import load_model
    d, tok = saved_dirs
    prompt = " ".join(f"w{i}" for i in PROMPT)
    rc = main(["generate", "--model", str(d / kind), "--prompt", prompt, "--max-new-tokens", "12",
               "--threads", "1", "--no-stop"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # reference: the model as loaded from disk, through model.generate
    model, _ = load_model(str(d / kind))
    if kind == "q":
        from physkern.layers import QuantizedLinear
        assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    ref = _reference(model, PROMPT, 12, stop_at_eos=False)
    assert lines[0] == prompt + tok.decode(ref, skip_special_tokens=True)
    assert lines[1].startswith(f"prefill {len(PROMPT)} tokens") and "tok/s" in lines[1]
    assert lines[2].startswith("decode 11 tokens") and "tok/s" in lines[2]


def test_cli_generate_compute_settings(saved_dirs, capsys):
    """--prefill-dtype bfloat16 / --decode-tables fp32 run and are restored afterwards."""
    import torch

    from physkern import ops
    from physkern.kernels import codebook_gemv_lut as lut
    d, _ = saved_dirs
    before = ops.prefill_dtype(), lut.decode_tables()
    rc = main(["generate", "--model", str(d / "q"), "--prompt", "w1 w2 w3", "--max-new-tokens",
               "4", "--threads", "1", "--no-stop", "--prefill-dtype", "bfloat16",
               "--decode-tables", "fp32"])
    assert rc == 0
    assert "decode 3 tokens" in capsys.readouterr().out
    assert (ops.prefill_dtype(), lut.decode_tables()) == before
    assert before[0] is None


@pytest.mark.parametrize("argv", [
    [], ["--prompt", "   "], ["--prompt", "w1", "--max-new-tokens", "0"],
    ["--prompt", "w1", "--max-new-tokens", "-2"], ["--prompt", "w1", "--threads", "0"]])
def test_cli_bad_inputs(saved_dirs, argv, capsys):
    d, _ = saved_dirs
    assert main(["generate", "--model", str(d / "q"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("physkern generate: error:")
