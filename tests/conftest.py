"""Test setup. TRITON_INTERPRET must be set before triton is imported anywhere."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Decode-time LUT GEMVs on exact fp32 tables: the suite compares every small-M path with fp32
# tolerances against float64 references. The int16 tables (the default outside tests, where
# AVX-512 VBMI exists) are tested against their own bound in test_codebook_gemv_lut16.py, which
# selects them explicitly. Child processes inherit this.
os.environ["PHYSKERN_DECODE_TABLES"] = "fp32"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    """A tiny random GPT-2 (Conv1D layers, tied wte/lm_head)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random LLaMA (nn.Linear layers, GQA 4:2 heads, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A folder with a tiny GPT-2 and a tokenizer trained on a synthetic corpus (model/) and that
    text (corpus.txt): the CLI end to end without the packaged model."""
    from _tiny import corpus_text, save_tiny_gpt2
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny"), corpus_text("Article", 400), 256)
