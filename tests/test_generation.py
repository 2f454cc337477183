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


# ---------------------------------------------------------------------------- as transformers users call it

def _peft_model(m, c):
    """The run's adapter c alone on a fresh backbone, as PEFT loads it: the reference."""
    from peft import PeftModel

    from elrea.models import load_backbone

    path = m.run_dir / ("base" if c == 0 else f"experts/{c}")
    return PeftModel.from_pretrained(load_backbone(m.config.model, "cpu"), str(path)).eval()


def test_tokenizer_argument_is_the_runs_or_refused(elrea_model, tmp_path):
    """transformers requires tokenizer= with stop_strings: the run's tokenizer (or a copy of it)
    is accepted and changes nothing; another vocabulary is refused, saying how to fix it."""
    from transformers import AutoTokenizer

    from elrea.testing import make_tiny_model

    m = elrea_model
    gen, ids, k = _varied_sample(m, _one_hot(1, len(m.adapters)))
    stop = [m.tokenizer.decode(ids[k:k + 1])]
    alone = m.generate(PROMPTS[:1], stop_strings=stop, **gen)
    copy = AutoTokenizer.from_pretrained(m.config.model.name)
    assert copy is not m.tokenizer
    for tok in (m.tokenizer, copy):
        assert m.generate(PROMPTS[:1], stop_strings=stop, tokenizer=tok, **gen) == alone
        assert "".join(m.stream(PROMPTS[0], stop_strings=stop, tokenizer=tok, **gen)) == alone[0]
    assert alone[0] == m.tokenizer.decode(ids[:k + 1], skip_special_tokens=True)   # the stop string did stop it
    bigger = AutoTokenizer.from_pretrained(m.config.model.name)
    bigger.add_tokens(["<extra_token>"])
    other = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path, ["quite other words, quite other merges"] * 20))

    class Swapped:   # the run's vocabulary with two ids exchanged: as many tokens, other ids
        name_or_path = "swapped"

        def get_vocab(self):
            v = m.tokenizer.get_vocab()
            a, b = m.tokenizer.convert_ids_to_tokens([100, 101])
            v[a], v[b] = v[b], v[a]
            return v

    for tok, how in [(bigger, "401 tokens against the run's 400"), (other, "279 tokens against the run's 400"),
                     (Swapped(), "'.+' is id 10[01] in it and id 10[01] in the run's")]:
        with pytest.raises(ConfigError, match=f"is not this run's tokenizer .*({how}).*pass tokenizer=model.tokenizer"):
            m.generate(PROMPTS[:1], stop_strings=stop, tokenizer=tok, **gen)
        with pytest.raises(ConfigError, match="is not this run's tokenizer"):
            next(m.stream(PROMPTS[0], stop_strings=stop, tokenizer=tok, **gen))


def test_token_ids_in_give_ids_out_as_transformers(elrea_model):
    """Token ids in every form model.generate takes give the tokens of the same prompts given as
    raw text, routed alike, returned as transformers returns them: [n, P + N], left-padded."""
    m = elrea_model
    tok = m.tokenizer
    texts = [PROMPTS[0], PROMPTS[1], "Uppercase the word kiwi."]
    gen = dict(max_new_tokens=10, do_sample=True, temperature=1.0, seed=11)
    ref = m.generate(texts, raw=True, return_dict_in_generate=True, **gen).sequences
    rows = [tok(t)["input_ids"] for t in texts]
    P = max(len(r) for r in rows)
    assert ref.dtype == torch.long and ref.shape[0] == 3 and ref.shape[1] > P
    for i, r in enumerate(rows):   # left-padded prompts, then the new tokens
        assert ref[i, :P].tolist() == [tok.pad_token_id] * (P - len(r)) + r
    new = [[t for t in row if t != tok.pad_token_id] for row in ref[:, P:].tolist()]
    assert [tok.decode(n, skip_special_tokens=True) for n in new] == m.generate(texts, raw=True, **gen)
    right = tok(texts, return_tensors="pt", padding=True)          # the tokenizer's default: right padding
    tok.padding_side = "left"
    try:
        left = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    assert right["attention_mask"][0, -1] == 0 and left["attention_mask"][0, 0] == 0
    for given in [dict(prompts=right["input_ids"], attention_mask=right["attention_mask"]),
                  dict(prompts=left),                               # a BatchEncoding
                  dict(**left),                                     # generate(**inputs), as with transformers
                  dict(prompts=left["input_ids"]),                  # no mask: the pad id at either end
                  dict(prompts=right["input_ids"]),
                  dict(prompts=rows),                               # lists of ids, ragged
                  dict(prompts=[torch.tensor(r) for r in rows])]:
        out = m.generate(**given, **gen)
        assert isinstance(out, torch.Tensor) and torch.equal(out, ref), given.keys()
    assert [e.input_ids for e in m.encode(right)] == rows            # routing reads these very ids
    assert torch.equal(m.route(right), m.route(texts and [m.formatter.encode_raw(t) for t in texts]))
    one = m.generate(torch.tensor(rows[1]), **gen)                  # one prompt: [T] in, [1, T + N] out
    assert one.shape[0] == 1 and one[0, :len(rows[1])].tolist() == rows[1]
    assert m.generate(rows[1], **gen).tolist() == one.tolist()        # a list of ints: one prompt
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        m.generate([[5, 10_000]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="no tokens once its padding is removed"):
        m.generate(torch.tensor([[3, 4], [0, 0]]), attention_mask=torch.tensor([[1, 1], [0, 0]]), max_new_tokens=2)
    with pytest.raises(ConfigError, match="attention_mask: its shape"):
        m.generate(right["input_ids"], attention_mask=right["attention_mask"][:, 1:], max_new_tokens=2)
    with pytest.raises(ConfigError, match="integer tensor"):
        m.generate(torch.rand(2, 3), max_new_tokens=2)


def test_sequences_and_scores_equal_peft_generate(elrea_model):
    """With one adapter at weight 1, sequences, scores (after the processors) and logits (before)
    are those of transformers' generate on PEFT's model with that adapter alone; scores hold one
    [n, V] tensor per new token."""
    m = elrea_model
    prompts = [m.prompt_ids(p) for p in PROMPTS]
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[m.tokenizer.pad_token_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    gen = dict(max_new_tokens=8, repetition_penalty=1.3, return_dict_in_generate=True, output_scores=True,
               output_logits=True)
    ref = _peft_model(m, 1).generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     pad_token_id=m.tokenizer.pad_token_id,
                                     eos_token_id=m.tokenizer.eos_token_id, **gen)
    ours = m.generate(ids, attention_mask=mask, weights=_one_hot(2, len(m.adapters), 1), **gen)
    assert torch.equal(ours.sequences, ref.sequences)
    n_new = ours.sequences.shape[1] - P
    assert len(ours.scores) == len(ours.logits) == n_new == len(ref.scores)
    assert ours.scores[0].shape == (2, ref.scores[0].shape[1]) and ours.scores[0].dtype == torch.float32
    for t in range(n_new):
        assert torch.allclose(ours.scores[t], ref.scores[t], atol=1e-4)
        assert torch.allclose(ours.logits[t], ref.logits[t], atol=1e-4)
    assert not torch.allclose(ours.scores[1], ours.logits[1])   # the repetition penalty acted on the scores
    # text in, ids out: the chat-formatted prompts, as a GenerationConfig asks
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=8, repetition_penalty=1.3, return_dict_in_generate=True,
                           output_scores=True)
    texts = m.generate(PROMPTS, generation_config=cfg, weights=_one_hot(2, len(m.adapters), 1))
    assert torch.equal(texts.sequences, ours.sequences) and texts.logits is None


def test_scores_are_the_mixed_logits(elrea_model):
    """With two adapters mixed, log_softmax of each step's scores at the chosen token sums to the
    ensemble's score of the new tokens (engine.score: one forward, another code path)."""
    m = elrea_model
    w = torch.zeros(1, len(m.adapters))
    w[0, 0], w[0, 2] = 0.3, 0.7
    out = m.generate(PROMPTS[:1], weights=w, max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    prompt = m.prompt_ids(PROMPTS[0])
    new = out.sequences[0, len(prompt):].tolist()
    assert len(out.scores) == len(new) and out.sequences[0, :len(prompt)].tolist() == prompt
    steps = sum(float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(out.scores, new))
    assert abs(steps - m.engine.score(prompt, [new], w[0])[0]) < 1e-3
    alone = m.generate(PROMPTS[:1], weights=_one_hot(1, len(m.adapters), 2), max_new_tokens=6,
                       return_dict_in_generate=True, output_scores=True)
    assert not torch.allclose(alone.scores[0], out.scores[0], atol=1e-3)     # the mix is not one adapter


def test_scores_need_return_dict_and_stream_yields_text(elrea_model):
    m = elrea_model
    with pytest.raises(ConfigError, match="output_scores=True needs return_dict_in_generate=True"):
        m.generate(PROMPTS, output_scores=True, max_new_tokens=2)
    with pytest.raises(ConfigError, match="stream: yields text"):
        next(m.stream(PROMPTS[0], return_dict_in_generate=True, max_new_tokens=2))
    with pytest.raises(ConfigError, match="prompts or input_ids=, not both"):
        m.generate(PROMPTS, input_ids=[[1, 2]], max_new_tokens=2)
    ids = torch.tensor([m.tokenizer(PROMPTS[1])["input_ids"]])
    streamed = "".join(m.stream(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5))
    assert streamed == m.generate(PROMPTS[1:], raw=True, max_new_tokens=5)[0]


def test_encoded_tensors_route_without_a_warning(elrea_model):
    """data.collate takes ids held as tensors (torch.tensor(tensor) warned: 'To copy construct')."""
    import warnings

    from elrea.data import Encoded

    m = elrea_model
    ids = m.prompt_ids(PROMPTS[0])
    as_lists = m.route([Encoded(ids, [-100] + ids[1:])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_tensors = m.route([Encoded(torch.tensor(ids), torch.tensor([-100] + ids[1:]))])
    assert torch.equal(as_lists, as_tensors)


def test_a_row_that_ends_keeps_its_eos_then_pads(elrea_model):
    """As model.generate: the EOS id that ends a row stays in `sequences`, pad ids follow it while
    other rows go on; its scores there are -inf but 0 at the pad id."""
    m = elrea_model
    w = _one_hot(2, len(m.adapters), 1)
    gen = dict(weights=w, max_new_tokens=8, do_sample=True, temperature=1.0, seed=2, return_dict_in_generate=True,
               output_scores=True)
    free = m.generate(PROMPTS, **gen)
    P = free.sequences.shape[1] - len(free.scores)
    row0, row1 = free.sequences[:, P:].tolist()
    j = next((j for j in range(1, len(row0) - 1) if row0[j] not in row0[:j] + row1), None)
    assert j is not None, f"no token of {row0} that {row1} lacks"
    cut = m.generate(PROMPTS, eos_token_id=[m.tokenizer.eos_token_id, row0[j]], **gen)
    pad = m.tokenizer.pad_token_id
    assert cut.sequences[0, P:].tolist() == row0[:j + 1] + [pad] * (len(row0) - j - 1)
    assert torch.equal(cut.sequences[1], free.sequences[1]) and len(cut.scores) == len(free.scores)
    assert torch.equal(cut.scores[j], free.scores[j])
    after = cut.scores[j + 1][0]
    assert after[pad] == 0 and torch.isinf(after).sum() == after.numel() - 1
    texts = m.generate(PROMPTS, eos_token_id=[m.tokenizer.eos_token_id, row0[j]],
                       **{k: v for k, v in gen.items() if k not in ("return_dict_in_generate", "output_scores")})
    assert texts[0] == m.tokenizer.decode(row0[:j], skip_special_tokens=True)    # text: the EOS id is not text


def test_pad_token_id_pads_the_ids_and_no_op_arguments_are_accepted(elrea_model):
    """pad_token_id= (what transformers users pass to silence its warning) pads the returned ids,
    prompts' left padding and ended rows alike; use_cache / num_beams=1 change nothing; beams,
    several sequences or attentions are refused, from keywords or a GenerationConfig."""
    from transformers import GenerationConfig

    m = elrea_model
    tok, other = m.tokenizer, 7
    assert other not in (tok.pad_token_id, tok.eos_token_id)
    ids = tok([m.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in PROMPTS],
              return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    w = _one_hot(2, len(m.adapters), 1)
    plain = m.generate(**ids, weights=w, max_new_tokens=6)
    padded = m.generate(**ids, weights=w, max_new_tokens=6, pad_token_id=other, use_cache=False, num_beams=1)
    assert plain.shape == padded.shape
    is_pad = plain == tok.pad_token_id
    assert is_pad.any(), "the prompts should differ in length"
    assert torch.equal(padded[is_pad], torch.full_like(padded[is_pad], other))
    assert torch.equal(padded[~is_pad], plain[~is_pad])
    via_config = m.generate(**ids, weights=w, generation_config=GenerationConfig(max_new_tokens=6, pad_token_id=other))
    assert torch.equal(via_config, padded)
    for bad in (dict(num_beams=4), dict(num_return_sequences=2), dict(output_attentions=True)):
        name = next(iter(bad))
        with pytest.raises(ConfigError, match=rf"generate: {name}=.* is not supported.*leave {name} out"):
            m.generate(PROMPTS, **bad)
    with pytest.raises(ConfigError, match=r"generation_config\.num_beams=2 is not supported"):
        m.generate(PROMPTS, generation_config=GenerationConfig(num_beams=2))
