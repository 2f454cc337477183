"""Training (elrea.training): an interrupted training resumes from its last checkpoint and ends
with the very adapter and Adam moments an uninterrupted one reaches."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from elrea.config import TrainConfig
from elrea.data import PromptFormatter, encode_all, load_records
from elrea.config import ModelConfig
from elrea.models import load_tokenizer
from elrea.training import MOMENTS_FILE, train_adapter

from conftest import lora_model


class _Crash(TrainerCallback):
    """Stops training with an exception right after the checkpoint of step `at` is saved."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt


class _Steps(TrainerCallback):
    """Records the optimizer steps this call runs."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(state.global_step)


@pytest.fixture(scope="module")
def examples(tiny_model_dir, toy_data):
    tok = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    return encode_all(PromptFormatter(tok, max_length=128), load_records(toy_data / "train.jsonl")[:48], "train"), tok


def _train(model_dir, examples, out, ckpt, fingerprint="fp", callbacks=None, resume=True, **trainer_args):
    enc, tok = examples
    cfg = TrainConfig(lr=2e-3, batch_size=8, micro_batch_size=4, max_steps=6, checkpoint_every=2,
                      trainer_args=trainer_args)
    model = lora_model(model_dir, randomize_b=False)
    return train_adapter(model, enc, cfg, out, tok.pad_token_id, seed=3, save_moments=True, fingerprint=fingerprint,
                         checkpoint_dir=ckpt, resume=resume, callbacks=callbacks)


def _saved(d):
    return load_file(str(d / "adapter_model.safetensors")), load_file(str(d / MOMENTS_FILE))


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("sampling", ["random", "batch_rebalance"])
def test_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir, examples, sampling):
    how = dict(train_sampling_strategy=sampling)
    whole = _train(tiny_model_dir, examples, tmp_path / "whole", tmp_path / "ck-whole", **how)
    assert not (tmp_path / "ck-whole").exists()  # removed once the adapter is saved

    ckpt = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model_dir, examples, tmp_path / "resumed", ckpt, callbacks=[_Crash(4)], **how)
    assert not (tmp_path / "resumed").exists() and (ckpt / "checkpoint-4").is_dir()
    steps = _Steps()
    summary = _train(tiny_model_dir, examples, tmp_path / "resumed", ckpt, callbacks=[steps], **how)
    assert steps.seen == [5, 6] and summary["steps"] == 6 and not ckpt.exists()
    for a, b in zip(_saved(tmp_path / "whole"), _saved(tmp_path / "resumed")):
        _same(a, b)
    # 6 steps of 8 are one epoch of the 48 examples: Trainer counted each one's tokens once,
    # across the interruption too
    assert whole["tokens"] == summary["tokens"] == sum(len(e.input_ids) for e in examples[0])


def test_tokens_are_counted_when_the_resumed_checkpoint_is_superseded(tmp_path, tiny_model_dir, examples):
    # resumed from step 2, the training saves step 4's checkpoint, and Trainer (save_total_limit=1)
    # deletes step 2's, the one it resumed from, before the training ends
    ckpt = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model_dir, examples, tmp_path / "a", ckpt, callbacks=[_Crash(2)])
    steps = _Steps()
    summary = _train(tiny_model_dir, examples, tmp_path / "a", ckpt, callbacks=[steps])
    assert steps.seen == [3, 4, 5, 6]
    assert summary["tokens"] == sum(len(e.input_ids) for e in examples[0])
    assert json.loads((tmp_path / "a" / "training.json").read_text())["tokens"] == summary["tokens"]


def test_tokens_are_not_reported_when_a_checkpoint_did_not_count_them(tmp_path, tiny_model_dir, examples):
    ckpt = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):  # as a checkpoint saved before elrea counted tokens
        _train(tiny_model_dir, examples, tmp_path / "a", ckpt, callbacks=[_Crash(4)],
               include_num_input_tokens_seen="no")
    summary = _train(tiny_model_dir, examples, tmp_path / "a", ckpt)
    assert summary["steps"] == 6 and "tokens" not in summary
    assert "tokens" not in json.loads((tmp_path / "a" / "training.json").read_text())


def test_identical_trainings_write_identical_readable_files(tmp_path, tiny_model_dir, examples):
    import json
    import os
    import stat

    _train(tiny_model_dir, examples, tmp_path / "a", None)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) > 1 and cfg["target_modules"] == sorted(cfg["target_modules"])
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "a").iterdir():   # as readable as the rest of the run, not 0600
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_checkpoints_of_another_training_are_not_resumed(tmp_path, tiny_model_dir, examples):
    ckpt = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model_dir, examples, tmp_path / "a", ckpt, fingerprint="other", callbacks=[_Crash(4)])
    steps = _Steps()
    _train(tiny_model_dir, examples, tmp_path / "a", ckpt, fingerprint="fp", callbacks=[steps])
    assert steps.seen == [1, 2, 3, 4, 5, 6]

    # resume=False (`elrea fit --from base`) starts over too, and leaves no checkpoints behind
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model_dir, examples, tmp_path / "b", ckpt, callbacks=[_Crash(2)])
    steps = _Steps()
    _train(tiny_model_dir, examples, tmp_path / "b", ckpt, resume=False, callbacks=[steps])
    assert steps.seen == [1, 2, 3, 4, 5, 6] and not ckpt.exists()


def test_trainer_length_grouped_sampling_pads_less(tmp_path, tiny_model_dir, examples, monkeypatch):
    """trainer_args {train_sampling_strategy: group_by_length or batch_rebalance} reach Trainer's
    own samplers (they read each item's input_ids): the same examples train in micro-batches of
    similar lengths."""
    import elrea.training as training

    enc, tok = examples
    # the examples' tokens repeated to lengths 8..102, so that random batches mix short and long ones
    varied = []
    for e, n in zip(enc, range(8, 104, 2)):
        ids = (e.input_ids * (n // len(e.input_ids) + 1))[:n]
        varied.append(type(e)(ids, [-100] * (n // 2) + ids[n // 2:]))
    widths = {}

    def run(name, **args):
        seen, real = [], training.collate

        def recording(batch, pad_id, side="right"):
            out = real(batch, pad_id, side)
            seen.append((out["input_ids"].numel(), int(out["attention_mask"].sum())))
            return out
        monkeypatch.setattr(training, "collate", recording)
        cfg = TrainConfig(lr=2e-3, batch_size=8, micro_batch_size=4, max_steps=4, trainer_args=args)
        summary = train_adapter(lora_model(tiny_model_dir, randomize_b=False), varied, cfg, tmp_path / name,
                                tok.pad_token_id, seed=3)
        assert summary["steps"] == 4
        widths[name] = sum(n for n, _ in seen) / sum(real_tokens for _, real_tokens in seen)   # padding factor

    run("random")
    run("grouped", train_sampling_strategy="group_by_length")
    run("rebalanced", train_sampling_strategy="batch_rebalance")   # random steps, micro-batches by length
    assert widths["grouped"] < widths["random"] - 0.1, widths
    assert widths["rebalanced"] < widths["random"] - 0.05, widths


def test_how_a_step_is_split_into_micro_batches_does_not_change_it(tmp_path, tiny_model_dir, examples):
    """The loss of an optimizer step is the mean over all its response tokens, whatever its
    micro-batches (Trainer's num_items_in_batch): what lets batch_rebalance split each random
    step by length without changing it. Plain SGD, no dropout, the same 16 examples in order."""
    from peft import get_peft_model

    from elrea.config import LoraConfig
    from elrea.models import load_backbone, peft_lora_config

    enc, tok = examples
    # loss on the last 1..n-1 tokens: micro-batches of very unequal token counts, whose means
    # would weigh tokens unequally if each micro-batch were averaged on its own
    enc = [type(e)(e.input_ids, [-100] * (len(e.input_ids) - k) + e.input_ids[-k:])
           for i, e in enumerate(enc[:16]) for k in [1 + (7 * i) % (len(e.input_ids) - 1)]]
    assert len({sum(x != -100 for x in e.labels) for e in enc}) > 6
    weights = {}
    for micro in (16, 4, 2):
        torch.manual_seed(0)
        model = get_peft_model(load_backbone(ModelConfig(name=str(tiny_model_dir))),
                               peft_lora_config(LoraConfig(dropout=0.0)))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
        cfg = TrainConfig(lr=0.5, batch_size=16, micro_batch_size=micro, max_steps=1,
                          trainer_args={"optim": "sgd", "train_sampling_strategy": "sequential"})
        train_adapter(model, enc, cfg, tmp_path / str(micro), tok.pad_token_id, seed=3)
        weights[micro] = load_file(str(tmp_path / str(micro) / "adapter_model.safetensors"))
    for micro in (4, 2):
        _same(weights[16], weights[micro])


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_cpu_dropout_is_dropout(p):
    """CpuDropout keeps each element with probability 1 - p and scales it by 1 / (1 - p), as
    nn.Dropout does; its masks follow torch's seed; its gradient is the same mask and scale."""
    from elrea.training import CpuDropout

    layer = CpuDropout(p).train()
    x = torch.randn(64, 50, 64, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * kept / (1 - p), rtol=1e-6, atol=0)

    torch.manual_seed(0)
    assert torch.equal(layer(x) != 0, kept)                  # the same seed, the same mask
    assert not torch.equal(layer(x) != 0, kept)              # the next call, another one
    xb = x.detach().bfloat16()
    assert layer(xb).dtype == torch.bfloat16
    assert torch.equal(layer.eval()(x), x)                   # eval mode: the identity
    assert torch.equal(CpuDropout(0.0).train()(x), x)


@pytest.mark.parametrize("n", [1, 2, 7, 1 << 15, (1 << 15) + 3])
def test_cpu_dropout_bits_are_numpys_integers(n):
    """The masks' bits, PCG64's raw outputs cut in halves, are the numbers numpy's own
    Generator.integers draws over the int32 range (even and odd counts)."""
    import numpy as np

    from elrea.training import uniform_int32

    for seed in (0, 12345, 2 ** 62 + 7):
        want = np.random.Generator(np.random.PCG64(seed)).integers(-(2 ** 31), 2 ** 31, size=n, dtype=np.int32)
        got = uniform_int32(seed, n)
        assert got.dtype == np.int32 and got.shape == (n,) and np.array_equal(got, want)


def test_training_on_the_cpu_uses_cpu_dropout_and_gives_the_layers_back(tmp_path, tiny_model_dir, examples):
    from elrea.training import CpuDropout, cpu_dropout

    seen = []

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen.append({type(m.lora_dropout["default"]) for m in model.modules() if hasattr(m, "lora_dropout")})

    enc, tok = examples
    model = lora_model(tiny_model_dir, randomize_b=False)
    layers = [m.lora_dropout for m in model.modules() if hasattr(m, "lora_dropout")]
    assert layers and all(type(d["default"]) is torch.nn.Dropout for d in layers)
    cfg = TrainConfig(lr=2e-3, batch_size=8, micro_batch_size=4, max_steps=2)
    train_adapter(model, enc, cfg, tmp_path / "a", tok.pad_token_id, seed=3, callbacks=[Look()])
    assert seen == [{CpuDropout}, {CpuDropout}]
    assert all(type(d["default"]) is torch.nn.Dropout for d in layers)   # put back: PEFT's own model again

    with pytest.raises(RuntimeError), cpu_dropout(model) as swapped:
        assert swapped == len(layers) and all(type(d["default"]) is CpuDropout for d in layers)
        raise RuntimeError("a failed training")
    assert all(type(d["default"]) is torch.nn.Dropout for d in layers)


def test_logits_only_where_a_label_is_are_the_loss_and_gradients_of_every_logit(tmp_path, tiny_model_dir, examples,
                                                                                 monkeypatch):
    """Training computes logits only at the positions whose next token is labelled
    (labelled_logits): the loss and every LoRA gradient are those of the model's own loss over
    every logit, train_adapter projects exactly the labelled tokens onto the vocabulary, and with
    that off (a model that cannot) it trains the same adapter."""
    import elrea.training as training
    from elrea.data import collate
    from elrea.training import labelled_logits, trims_logits

    enc, tok = examples
    model = lora_model(tiny_model_dir)   # eval mode: no dropout, the same function twice
    batch = collate(enc[:8], tok.pad_token_id)
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < n < batch["labels"].numel() / 2

    def loss_and_grads(b):
        model.zero_grad()
        out = model(**b, num_items_in_batch=torch.tensor(n))
        out.loss.backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    (full, g_full), (kept, g_kept) = loss_and_grads(batch), loss_and_grads(labelled_logits(batch))
    assert trims_logits(model) and kept.logits.shape == (n, full.logits.shape[-1])
    assert torch.allclose(full.loss, kept.loss, rtol=1e-6, atol=0)
    for k in g_full:
        assert g_full[k].abs().max() > 0 and torch.allclose(g_full[k], g_kept[k], rtol=1e-5, atol=1e-8), k

    def train(name):
        projected, labelled, real = [], [], training.collate

        def recording(batch, pad_id, side="right"):
            out = real(batch, pad_id, side)
            labelled.append((int((out["labels"][:, 1:] != -100).sum()), out["labels"].numel()))
            return out
        monkeypatch.setattr(training, "collate", recording)
        m = lora_model(tiny_model_dir, randomize_b=False)
        m.get_output_embeddings().register_forward_hook(lambda mod, args, out: projected.append(args[0].shape[:-1].numel()))
        cfg = TrainConfig(lr=2e-3, batch_size=8, micro_batch_size=4, max_steps=3)
        train_adapter(m, enc, cfg, tmp_path / name, tok.pad_token_id, seed=3)
        return projected, labelled, load_file(str(tmp_path / name / "adapter_model.safetensors"))

    projected, labelled, trimmed = train("trimmed")
    # (the data loader may collate a batch ahead of the last step)
    assert len(projected) == 6 and projected == [k for k, _ in labelled][:6]
    monkeypatch.setattr(training, "trims_logits", lambda model: False)
    projected, labelled, every = train("every")
    assert projected == [t for _, t in labelled][:6]
    for k in trimmed:
        assert torch.allclose(trimmed[k], every[k], rtol=1e-5, atol=1e-7), k


def test_models_that_cannot_keep_some_logits_get_them_all():
    from elrea.training import trims_logits

    class Plain(torch.nn.Module):   # a forward without logits_to_keep (remote code, older models)
        def forward(self, input_ids, attention_mask=None, labels=None):
            return input_ids

    assert not trims_logits(Plain())


@pytest.mark.parametrize("amx,precision,hinted", [(True, "float32", True), (True, "bfloat16", False),
                                                  (False, "float32", False)])
def test_a_cpu_with_amx_training_in_float32_is_told_of_bfloat16(tmp_path, tiny_model_dir, examples, monkeypatch,
                                                                 caplog, amx, precision, hinted):
    """torch's AMX probe decides the hint: only float32 on a CPU with AMX gets it, and never a GPU."""
    import logging

    from elrea.models import precision_hint

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    enc, tok = examples
    model = lora_model(tiny_model_dir, randomize_b=False)
    cfg = TrainConfig(lr=2e-3, batch_size=8, micro_batch_size=4, max_steps=1)
    with caplog.at_level(logging.INFO, logger="elrea"):
        train_adapter(model, enc, cfg, tmp_path / "a", tok.pad_token_id, seed=3, precision=precision)
    said = [r.getMessage() for r in caplog.records if "model.dtype=bfloat16" in r.getMessage()]
    assert len(said) == (1 if hinted else 0)
    assert precision_hint(torch.device("cuda", 0), "float32") is None
