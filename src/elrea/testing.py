"""Tiny offline models and data for tests and quick benchmark variants.

`make_tiny_model` builds a few-layer Llama with a byte-level BPE tokenizer trained on the
given texts and a ChatML chat template, and saves it as an ordinary transformers directory,
so that every code path that loads "any causal LM from a directory" is exercised without
the network.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_model(out_dir: str | Path, texts: list[str], hidden: int = 32, layers: int = 2,
                    vocab_size: int = 400, seed: int = 0, chat_template: bool = True) -> Path:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = CHATML
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


TASKS = {
    "add": lambda a, b: (f"Add {a} and {b}.", str(a + b)),
    "sub": lambda a, b: (f"Subtract {b} from {a}.", str(a - b)),
    "rev": lambda a, b: (f"Reverse the word {_word(a, b)}.", _word(a, b)[::-1]),
    "upper": lambda a, b: (f"Uppercase the word {_word(a, b)}.", _word(a, b).upper()),
}


def _word(a: int, b: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[(a * 7 + b * 3 + i * 5) % 26] for i in range(3 + (a + b) % 3))


def make_toy_records(n: int, seed: int = 0, tasks: list[str] | None = None) -> list[dict]:
    """`n` records from a few simple sources with distinct rules (add, sub, rev, upper)."""
    rng = random.Random(seed)
    tasks = tasks or list(TASKS)
    rows = []
    for i in range(n):
        src = tasks[i % len(tasks)]
        q, a = TASKS[src](rng.randint(0, 20), rng.randint(0, 20))
        rows.append({"instruction": q, "response": a, "source": src})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
