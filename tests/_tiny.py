"""A tiny GPT-2 saved to disk with a byte-level BPE tokenizer trained on a synthetic corpus: the
CLI end to end without the packaged model (conftest's `saved_tiny`, test_bad_inputs' `saved`)."""
from pathlib import Path

import torch


def corpus_text(word: str = "Article", n: int = 400) -> str:
    return "\n\n".join(
        f"{word} {i}. The quick brown fox {i % 7} jumps over the lazy dog near river {i % 5}. "
        f"Numbers like {i * 37 % 101} and words such as alpha beta gamma follow."
        for i in range(n))


def save_tiny_gpt2(d: Path, text: str, n_positions: int) -> Path:
    """d/model (GPT-2, 2 layers, width 32, context n_positions, tokenizer) and d/corpus.txt."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32,
                                       n_layer=2, n_head=2)).eval()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "corpus.txt").write_text(text)
    return d
