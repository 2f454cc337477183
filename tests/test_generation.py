"""Generation arguments as in transformers, streaming, and raw (context, continuation) scoring."""

import pytest
import torch

from elrea.errors import ConfigError

PROMPTS = ["Add 3 and 4.", "Reverse the word hello please."]


def _one_hot(n, k, c=0):
    w = torch.zeros(n, k)
    w[:, c] = 1.0
    return w


def _peft_reference(m, prompt, c, **gen):
    """transformers' own generate with adapter c alone: the reference for a one-hot ensemble."""
    from peft import PeftModel

    from elrea.models import load_backbone

    path = m.run_dir / ("base" if c == 0 else f"experts/{c}")
    ref = PeftModel.from_pretrained(load_backbone(m.config.model, "cpu"), str(path)).eval()
    ids = torch.tensor([m.prompt_ids(prompt)])
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=m.tokenizer.pad_token_id,
                       eos_token_id=m.tokenizer.eos_token_id, **gen)
    return m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_unknown_generation_argument_is_a_clear_error(elrea_model):
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) 'max_length'.*valid: max_new_tokens, do_sample"):
        elrea_model.generate(PROMPTS, max_length=5)
    with pytest.raises(ConfigError, match="top_p must be in"):
        elrea_model.generate(PROMPTS, do_sample=True, top_p=0)


def test_transformers_processors_match_peft_generate(elrea_model):
    """repetition_penalty, top_k, temperature: the same tokens as transformers with that adapter
    alone (greedy after the processors, so the comparison is exact)."""
    m = elrea_model
    k = len(m.adapters)
    for gen in [dict(max_new_tokens=10, repetition_penalty=1.5), dict(max_new_tokens=10)]:
        ours = m.generate(PROMPTS[:1], weights=_one_hot(1, k, 1), **gen)[0]
        assert ours == _peft_reference(m, PROMPTS[0], 1, do_sample=False, **gen)


def test_generation_config_equals_keywords(elrea_model):
    from transformers import GenerationConfig

    m = elrea_model
    cfg = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.9, top_k=20, min_p=0.05)
    a = m.generate(PROMPTS, generation_config=cfg, seed=5)
    b = m.generate(PROMPTS, max_new_tokens=7, do_sample=True, temperature=0.9, top_k=20, min_p=0.05, seed=5)
    assert a == b
    assert m.generate(PROMPTS, generation_config=cfg, seed=5) == a  # seeded: reproducible


def _varied_sample(m, w):
    """(generation kwargs, token ids, k): seeded sampling whose output has, at k >= 1, a token
    not seen before that decodes to plain letters (the tiny model's greedy output repeats one)."""
    for seed in range(50):
        gen = dict(weights=w, max_new_tokens=12, do_sample=True, temperature=1.0, seed=seed)
        ids = m.engine.generate([m.prompt_ids(PROMPTS[0])], w,
                                m.decoding(max_new_tokens=12, do_sample=True, temperature=1.0, seed=seed))[0]
        for k in range(1, len(ids) - 1):
            piece = m.tokenizer.decode(ids[k:k + 1])
            if ids[k] not in ids[:k] and piece.strip().isalpha() and piece.isascii() \
                    and piece not in m.tokenizer.decode(ids[:k]):
                return gen, ids, k
    pytest.fail("no seed gave a varied sample")


def test_every_eos_id_stops_and_stop_strings_stop(elrea_model):
    m = elrea_model
    w = _one_hot(1, len(m.adapters))
    gen, ids, k = _varied_sample(m, w)
    free = m.generate(PROMPTS[:1], **gen)[0]
    assert free == m.tokenizer.decode(ids, skip_special_tokens=True)
    # token k listed as one more EOS id: decoding ends before it (EOS ids are not text)
    cut = m.generate(PROMPTS[:1], eos_token_id=[m.tokenizer.eos_token_id, ids[k]], **gen)[0]
    assert cut == m.tokenizer.decode(ids[:k], skip_special_tokens=True)
    # a stop string ends decoding after the token that completes it, kept as in transformers
    text = m.generate(PROMPTS[:1], stop_strings=[m.tokenizer.decode(ids[k:k + 1])], **gen)[0]
    assert text == m.tokenizer.decode(ids[:k + 1], skip_special_tokens=True) and len(text) < len(free)


def test_stream_and_streamer_give_the_generated_text(elrea_model):
    from transformers.generation.streamers import BaseStreamer

    m = elrea_model
    full = m.generate(PROMPTS[1:], max_new_tokens=9)[0]
    pieces = list(m.stream(PROMPTS[1], max_new_tokens=9))
    assert "".join(pieces) == full and len(pieces) > 1

    class Collect(BaseStreamer):
        def __init__(self):
            self.calls, self.ended = [], False

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.ended = True

    s = Collect()
    assert m.generate(PROMPTS[1:], max_new_tokens=9, streamer=s)[0] == full
    assert s.calls[0][0] == m.prompt_ids(PROMPTS[1]) and s.ended  # the prompt first, as transformers does
    assert m.tokenizer.decode([t[0] for t in s.calls[1:]], skip_special_tokens=True) == full


def test_loglikelihood_of_raw_pairs(elrea_model):
    """lm-eval's request shape: raw text, routed on the context; equals the ensemble's score of
    the same tokens, and 'greedy' says whether decoding would produce the continuation."""
    m = elrea_model
    context = "Add 3 and 4. The answer is "
    greedy_cont = m.generate([context], raw=True, max_new_tokens=3, weights=_one_hot(1, len(m.adapters)))[0]
    reqs = [(context, "7"), (context, "seven"), ("Reverse abc:", " cba"), (context, greedy_cont or "x")]
    got = m.loglikelihood(reqs)
    assert len(got) == 4 and all(lp <= 0 for lp, _ in got)
    # trailing space moved into the continuation, as lm-eval's HF backend does
    ctx_ids = m.tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"]
    whole = m.tokenizer(context + "7", add_special_tokens=False)["input_ids"]
    w = m.route([m.formatter.encode_raw(context.rstrip(), add_special_tokens=False)])[0]
    ref = m.engine.score(ctx_ids, [whole[len(ctx_ids):]], w)[0]
    assert abs(got[0][0] - ref) < 1e-5
    # 'greedy': true exactly when every continuation token is the mixed logits' argmax
    w1 = _one_hot(1, len(m.adapters))
    greedy_ids = m.engine.generate([ctx_ids], w1, m.decoding(max_new_tokens=4))[0]
    other = greedy_ids[:-1] + [(greedy_ids[-1] + 1) % len(m.tokenizer)]
    flags = m.engine.score(ctx_ids, [greedy_ids, other], w1[0], greedy=True)
    assert [f for _, f in flags] == [True, False] and flags[0][0] > flags[1][0]


def test_one_chat_or_many_prompts(elrea_model):
    m = elrea_model
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert m.prompt_ids(chat) == m.prompt_ids(PROMPTS[0])
    assert len(m.encode(chat)) == 1 and len(m.encode([chat, PROMPTS[1]])) == 2
    assert m.generate(chat, max_new_tokens=4) == m.generate([PROMPTS[0]], max_new_tokens=4)
