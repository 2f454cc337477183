"""Contract 3 (ensemble reduces to a single adapter) and contract 5 (save/load round trip)."""

import torch

from elrea import ELREA
from elrea.ensemble import mix_in_layers

PROMPTS = ["Add 3 and 4.", "Reverse the word hello.", "Uppercase the word kiwi please now."]


def _single_adapter_model(run, adapter_dir):
    """The reference: plain PEFT with one adapter, as a user would load it."""
    from peft import PeftModel

    from elrea.models import load_backbone

    return PeftModel.from_pretrained(load_backbone(run.config.model), str(adapter_dir)).eval()


def _one_hot(n, k, c):
    w = torch.zeros(n, k)
    w[:, c] = 1.0
    return w


def test_weight_one_reproduces_peft_generate(elrea_model, fitted_run):
    m = elrea_model
    for c, path in [(0, fitted_run / "base"), (2, fitted_run / "experts" / "2")]:
        ref = _single_adapter_model(m, path)
        ours = m.generate(PROMPTS, weights=_one_hot(3, len(m.adapters), c), max_new_tokens=12)
        for p, text in zip(PROMPTS, ours):
            ids = torch.tensor([m.prompt_ids(p)])
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, eos_token_id=m.tokenizer.eos_token_id,
                               pad_token_id=m.tokenizer.pad_token_id)
            expected = m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            assert text == expected
            assert len(m.tokenizer(text)["input_ids"]) > 0


def _logprob(model, prompt_ids, cont_ids, adapters_weights):
    ids = torch.tensor([prompt_ids + cont_ids])
    logits = 0
    for name, w in adapters_weights:
        model.set_adapter(name)
        with torch.no_grad():
            logits = logits + w * model(input_ids=ids).logits[0].float()
    model.set_adapter("base")
    logp = torch.log_softmax(logits, -1)
    n = len(cont_ids)
    pos = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + n)
    return float(logp[pos, torch.tensor(cont_ids)].sum())


def test_score_equals_single_adapter_loglik_and_mixture(elrea_model):
    m = elrea_model
    conts = ["7", "olleh", "KIWI done"]
    cont_ids = [m.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
    pid = m.prompt_ids(PROMPTS[0])
    k = len(m.adapters)
    got = m.score(PROMPTS[0], conts, weights=_one_hot(1, k, 1)[0])
    for g, ci in zip(got, cont_ids):
        assert abs(g - _logprob(m.model, pid, ci, [("expert_1", 1.0)])) < 1e-4
    w = torch.zeros(k)
    w[0], w[3] = 0.3, 0.7
    got = m.score(PROMPTS[0], conts, weights=w)
    for g, ci in zip(got, cont_ids):
        assert abs(g - _logprob(m.model, pid, ci, [("base", 0.3), ("expert_3", 0.7)])) < 1e-4


def _naive_greedy(model, prompt_ids, adapters_weights, steps, eos):
    """One full forward per adapter per step, no cache: the straightforward ensemble."""
    ids = list(prompt_ids)
    for _ in range(steps):
        x = torch.tensor([ids])
        logits = 0
        for name, w in adapters_weights:
            model.set_adapter(name)
            with torch.no_grad():
                logits = logits + w * model(input_ids=x).logits[0, -1].float()
        nxt = int(logits.argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    model.set_adapter("base")
    return ids[len(prompt_ids):]


def test_batched_ensemble_equals_naive_ensemble(elrea_model):
    m = elrea_model
    w = m.route(PROMPTS)
    assert torch.allclose(w.sum(1), torch.ones(3))
    ours = m.generate(PROMPTS, weights=w, max_new_tokens=8)
    for p, row, text in zip(PROMPTS, w, ours):
        toks = _naive_greedy(m.model, m.prompt_ids(p), list(zip(m.adapters, row.tolist())), 8,
                             m.tokenizer.eos_token_id)
        assert text == m.tokenizer.decode(toks, skip_special_tokens=True)


def test_in_layer_mixing_with_one_hot_equals_adapter(elrea_model):
    m = elrea_model
    k = len(m.adapters)
    names = mix_in_layers(m.model, _one_hot(1, k, 2), m.adapters, prefix="t")
    ids = torch.tensor([m.prompt_ids(PROMPTS[1])])
    try:
        with torch.no_grad():
            m.model.set_adapter(names[0])
            mixed = m.model(input_ids=ids).logits
            m.model.set_adapter("expert_2")
            single = m.model(input_ids=ids).logits
        assert torch.allclose(mixed, single, atol=1e-5)
    finally:
        m.model.delete_adapter(names[0])
        m.model.set_adapter("base")
    assert m.generate(PROMPTS[:1], weights=_one_hot(1, k, 2), mode="weights", max_new_tokens=6) == \
        m.generate(PROMPTS[:1], weights=_one_hot(1, k, 2), max_new_tokens=6)


def test_save_load_round_trip(elrea_model, tmp_path):
    m = elrea_model
    out = m.save_pretrained(tmp_path / "copy")
    again = ELREA.from_pretrained(out)
    assert torch.equal(m.route(PROMPTS), again.route(PROMPTS))
    assert m.generate(PROMPTS, max_new_tokens=8) == again.generate(PROMPTS, max_new_tokens=8)
    assert m.score(PROMPTS[0], ["7", "8"]) == again.score(PROMPTS[0], ["7", "8"])
