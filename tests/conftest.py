"""Test setup. TRITON_INTERPRET must be set before triton is imported anywhere."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


TINY_TEXT = "\n\n".join(
    f"Article {i}. The quick brown fox {i % 7} jumps over the lazy dog near river {i % 5}. "
    f"Numbers like {i * 37 % 101} and words such as alpha beta gamma follow."
    for i in range(400))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A folder with a tiny GPT-2 and a tokenizer trained on TINY_TEXT (model/) and that text
    (corpus.txt): the CLI end to end without the packaged model."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tiny")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TINY_TEXT], vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32,
                                       n_layer=2, n_head=2)).eval()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "corpus.txt").write_text(TINY_TEXT)
    return d
