"""Contract 1: batched per-example gradients equal one-backward-per-example autograd."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import lora_model
from elrea.config import ModelConfig
from elrea.data import PromptFormatter, collate, parse_record
from elrea.features import AdamPreconditioner, batch_features, per_example_gradients, per_example_loss
from elrea.models import load_tokenizer
from elrea.projection import SparseProjector


def _encoded(tiny_model_dir, toy_rows, n=6, train=False):
    tok = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    fmt = PromptFormatter(tok)
    recs = [parse_record(r, dict(path="t", line=i)) for i, r in enumerate(toy_rows[:n])]
    # vary the lengths: repeat some instructions so examples differ by many tokens
    for i, r in enumerate(recs):
        r.messages[-1]["content"] = r.messages[-1]["content"] + " please" * (3 * i)
    enc = [fmt.encode_train(r) if train else fmt.encode_instruction(r.messages) for r in recs]
    return tok, enc


def _reference(model, enc, pad_id):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for e in enc:  # one example, unpadded, one backward
        b = collate([e], pad_id)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = per_example_loss(out.logits, b["labels"]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("train", [False, True])
def test_per_example_gradients_match_autograd(tiny_model_dir, toy_rows, side, train):
    tok, enc = _encoded(tiny_model_dir, toy_rows, train=train)
    lengths = {len(e.input_ids) for e in enc}
    assert len(lengths) > 3, "examples must differ in length"
    model = lora_model(tiny_model_dir)
    G = per_example_gradients(model, collate(enc, tok.pad_token_id, side=side))
    R = _reference(model, enc, tok.pad_token_id)
    assert G.shape == R.shape == (len(enc), sum(p.numel() for p in model.parameters() if p.requires_grad))
    cos = F.cosine_similarity(G, R, dim=1)
    rel = (G - R).norm(dim=1) / R.norm(dim=1)
    assert cos.min() >= 0.9999, cos
    assert rel.max() <= 1e-4, rel


def test_gradients_are_per_example_not_shared(tiny_model_dir, toy_rows):
    tok, enc = _encoded(tiny_model_dir, toy_rows, n=4)
    model = lora_model(tiny_model_dir)
    G = per_example_gradients(model, collate(enc, tok.pad_token_id))
    # different examples have clearly different gradients, and their sum is the batch gradient
    assert F.cosine_similarity(G[0], G[1], dim=0) < 0.999
    params = [p for p in model.parameters() if p.requires_grad]
    b = collate(enc, tok.pad_token_id)
    out = model(**{k: b[k] for k in ("input_ids", "attention_mask")})
    total = torch.autograd.grad(per_example_loss(out.logits, b["labels"]).sum(), params)
    assert torch.allclose(G.sum(0), torch.cat([t.reshape(-1) for t in total]), rtol=1e-4, atol=1e-6)


def test_adam_preconditioner_formula():
    g = torch.randn(3, 10)
    m, v = torch.randn(10), torch.rand(10)
    pre = AdamPreconditioner({"w": (m, v)}, betas=(0.9, 0.999), eps=1e-8)
    expected = (0.9 * m + 0.1 * g) / ((0.999 * v + 0.001 * g ** 2).sqrt() + 1e-8)
    assert torch.allclose(pre("w", g), expected)
    with pytest.raises(KeyError):
        pre("missing", g)


def test_adam_preconditioner_in_place_equals_the_formula_bit_for_bit():
    """The in-place preconditioner performs the formula's operations in its order, so its float32
    result is the one the out-of-place expression gives, bit for bit (features unchanged)."""
    torch.manual_seed(0)
    g = torch.randn(4, 1000) * torch.logspace(-6, 1, 1000)
    m, v = torch.randn(1000) * 1e-3, torch.rand(1000) * 1e-6
    b1, b2, eps = 0.9, 0.999, 1e-8
    pre = AdamPreconditioner({"w": (m, v)}, betas=(b1, b2), eps=eps)
    old = (b1 * m.reshape(1, -1) + (1 - b1) * g) / ((b2 * v.reshape(1, -1) + (1 - b2) * g * g).sqrt() + eps)
    assert torch.equal(pre("w", g), old)
    assert torch.equal(pre("w", g * 2), (b1 * m + (1 - b1) * g * 2) / ((b2 * v + (1 - b2) * (g * 2) * (g * 2)).sqrt() + eps))


def test_batch_features_are_unit_and_batch_independent(tiny_model_dir, toy_rows):
    tok, enc = _encoded(tiny_model_dir, toy_rows, n=5)
    model = lora_model(tiny_model_dir)
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    proj = SparseProjector(p, 256, seed=3)
    both = batch_features(model, collate(enc, tok.pad_token_id), proj)
    assert torch.allclose(both.norm(dim=1), torch.ones(5), atol=1e-5)
    alone = torch.cat([batch_features(model, collate([e], tok.pad_token_id), proj) for e in enc])
    assert torch.allclose(both, alone, atol=1e-5)


def test_the_featurizer_batches_longest_first_and_keeps_each_row_in_place(tiny_model_dir, toy_rows):
    """Units of window x batch_size consecutive examples, batched longest first inside: every
    batch is padded to lengths close to its own, and each row is its example's feature alone."""
    from elrea.features import Featurizer

    tok, enc = _encoded(tiny_model_dir, toy_rows, n=10)
    enc = [enc[i] for i in (0, 9, 1, 8, 2, 7, 3, 6, 4, 5)]       # short and long interleaved
    model = lora_model(tiny_model_dir)
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    feat = Featurizer(model, SparseProjector(p, 256, seed=3), adapter=None, pad_id=tok.pad_token_id,
                      batch_size=2, window=2)
    assert feat.plan(enc) == [(0, 4), (4, 8), (8, 10)]
    seen = []
    real = feat._features
    feat._features = lambda batch: seen.append([len(e.input_ids) for e in batch]) or real(batch)
    got = feat.features(enc)
    lengths = [len(e.input_ids) for e in enc]
    units = [sorted(lengths[s:e], reverse=True) for s, e in feat.plan(enc)]
    assert seen == [u[i:i + 2] for u in units for i in range(0, len(u), 2)]
    alone = torch.cat([batch_features(model, collate([e], tok.pad_token_id), feat.projector) for e in enc])
    assert torch.allclose(got, alone, atol=1e-5)


def test_per_example_loss_equals_the_transposed_layout_within_float32_rounding():
    """The loss reads the logits as contiguous [n*T, V] rows; the [n, V, T] layout it replaced
    gives the same losses up to float32 summation order (the features' exact references,
    above, hold either way), and a row without labels still counts as 0."""
    torch.manual_seed(0)
    n, T, V = 3, 9, 50
    logits = torch.randn(n, T, V)
    labels = torch.randint(0, V, (n, T))
    labels[0, :4] = -100
    labels[2] = -100
    old_tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    old = old_tok.sum(1) / (labels[:, 1:] != -100).sum(1).clamp(min=1)
    new = per_example_loss(logits, labels)
    assert torch.allclose(new, old, rtol=1e-6, atol=0) and new[2] == 0


def test_peak_memory_counts_what_a_block_allocates_and_leaves_the_process_peak_alone(monkeypatch):
    import resource
    import time

    from elrea.models import PeakMemory, free_memory, resident_bytes

    if resident_bytes() is None:
        pytest.skip("the resident set is read on Linux only")
    spike = torch.ones(256 * 2 ** 20 // 4)           # a process peak before the blocks
    del spike
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with PeakMemory("cpu") as big:
        x = torch.ones(64 * 2 ** 20 // 4)           # 64 MiB, written so that every page is resident
        time.sleep(0.05)
        del x
    with PeakMemory("cpu") as none:
        time.sleep(0.05)
    assert 60 * 2 ** 20 <= big.bytes <= 96 * 2 ** 20, big.bytes
    assert big.peak - big.start == big.bytes
    assert none.bytes < 8 * 2 ** 20, none.bytes
    with pytest.raises(ValueError), PeakMemory("cpu") as failed:
        raise ValueError
    assert failed.bytes is None
    # ru_maxrss (and so /usr/bin/time) still reports the earlier, larger peak
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >= before
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = free_memory("cpu")
    assert 0 < alone <= int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert free_memory("cpu") < alone / 2                  # four processes share the machine
    assert free_memory("meta") is None


def _featurizer(tiny_model_dir, toy_rows, n=12, **kw):
    from elrea.features import Featurizer

    tok, enc = _encoded(tiny_model_dir, toy_rows, n=n)
    model = lora_model(tiny_model_dir)
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    feat = Featurizer(model, SparseProjector(p, 256, seed=3), adapter=None, pad_id=tok.pad_token_id, **kw)
    seen = []
    real = feat._features
    feat._features = lambda batch: seen.append([len(e.input_ids) for e in batch]) or real(batch)
    return tok, enc, model, feat, seen


def test_the_featurizer_fits_its_batches_to_the_memory_its_first_batch_took(tiny_model_dir, toy_rows,
                                                                             monkeypatch, caplog):
    """The first batch (at most PROBE_TOKENS) is measured; later ones hold at most the tokens that
    fit in memory_fraction of the free memory at that rate, and the features are those computed
    one example at a time."""
    import elrea.features as features

    class Measured:                                   # the first batch took 10 MiB
        def __init__(self, device):
            self.bytes = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.bytes = 10 * 2 ** 20

    monkeypatch.setattr(features, "PeakMemory", Measured)
    monkeypatch.setattr(features, "free_memory", lambda device: 10 * 2 ** 20)
    tok, enc, model, feat, seen = _featurizer(tiny_model_dir, toy_rows, batch_size=4, window=3)
    with caplog.at_level("INFO", logger="elrea"):
        got = feat.features(enc)
    first = len(seen[0]) * seen[0][0]
    assert feat.bytes_per_token == 10 * 2 ** 20 / first
    assert feat.token_cap == int(0.5 * 10 * 2 ** 20 / feat.bytes_per_token) <= first // 2
    assert all(len(b) * max(b) <= feat.token_cap for b in seen[1:])
    assert any(len(b) < 4 for b in seen[1:]), "the cap must bind in this test"
    assert f"at most {feat.token_cap} padded tokens a batch" in caplog.text
    alone = torch.cat([batch_features(model, collate([e], tok.pad_token_id), feat.projector) for e in enc])
    assert torch.allclose(got, alone, atol=1e-5)

    # an example that alone needs more than the share runs alone, with a warning
    monkeypatch.setattr(features, "free_memory", lambda device: 2 ** 20)
    caplog.clear()
    tok, enc, model, feat, seen = _featurizer(tiny_model_dir, toy_rows, n=6, batch_size=4)
    with caplog.at_level("INFO", logger="elrea"):
        feat.features(enc)
    assert feat.token_cap < min(len(e.input_ids) for e in enc)
    assert all(len(b) == 1 for b in seen[1:])
    assert "lower data.max_length" in caplog.text


def test_the_featurizer_keeps_its_setting_when_memory_is_plenty_unmeasured_or_not_asked(tiny_model_dir,
                                                                                        toy_rows, monkeypatch):
    import elrea.features as features

    tok, enc, model, feat, seen = _featurizer(tiny_model_dir, toy_rows, batch_size=4, max_tokens=4096)
    feat.features(enc)                              # the real measurement, on the tiny model
    assert feat.token_cap == 4096 and feat.bytes_per_token > 0
    assert feat.bytes_per_token < 2 ** 20, "the tiny model takes far less than a MiB a token"
    tok, enc, model, feat, seen = _featurizer(tiny_model_dir, toy_rows, batch_size=4, memory_fraction=None)
    feat.features(enc)
    assert feat.token_cap is None and feat.max_tokens_now() == 0 and all(len(b) == 4 for b in seen)
    monkeypatch.setattr(features, "free_memory", lambda device: None)
    tok, enc, model, feat, seen = _featurizer(tiny_model_dir, toy_rows, batch_size=4, max_tokens=100)
    feat.features(enc)
    assert feat.token_cap == 100 and feat.bytes_per_token is None
