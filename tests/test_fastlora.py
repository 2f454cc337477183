"""Stacked LoRA (elrea.fastlora) against PEFT: single-adapter outputs and mixed-adapter batches."""

import pytest
import torch

from elrea import fastlora
from elrea.ensemble import left_pad
from elrea.features import position_ids_from_mask

from conftest import lora_model


@pytest.fixture(scope="module")
def three_adapters(tiny_model_dir):
    """The tiny backbone with adapters default, b, c (random non-zero B, different scalings, ranks)."""
    from elrea.config import LoraConfig
    from elrea.models import peft_lora_config

    model = lora_model(tiny_model_dir, seed=0)          # adapter "default"
    for name, alpha, rank in [("b", 8.0, 8), ("c", 32.0, 4)]:     # c: another rank, zero-padded
        model.add_adapter(name, peft_lora_config(LoraConfig(alpha=alpha, rank=rank)))
    assert {p.shape[0] for n, p in model.named_parameters() if "lora_A.c." in n} == {4}
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval(), ["default", "b", "c"]


def _batch(n_rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 60, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_rows)]
    ids, mask = left_pad(seqs, 0)
    return dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))


def _single(model, adapter, batch, rows):
    """Reference: plain PEFT, one adapter active, on the given rows."""
    model.set_adapter(adapter)
    with torch.no_grad():
        out = model(**{k: v[rows] for k, v in batch.items()}).logits
    model.set_adapter("default")
    return out


@pytest.mark.parametrize("layout", [["default"] * 2 + ["b"] * 2 + ["c"] * 2,      # adapter-major
                                    ["b", "default", "c", "b", "c", "default", "b"]])  # any order
@pytest.mark.parametrize("chunk_rows", [fastlora.CHUNK_ROWS, 5])
def test_stacked_rows_equal_single_adapter_peft(three_adapters, layout, chunk_rows, monkeypatch):
    monkeypatch.setattr(fastlora, "CHUNK_ROWS", chunk_rows)   # 5: the LoRA sums a block of rows at a time
    model, adapters = three_adapters
    assert fastlora.supported(model, adapters)
    batch = _batch(len(layout))
    with torch.no_grad():
        before = model(**batch).logits
    stack = fastlora.Stacked(model, adapters)
    try:
        sel = stack.select(torch.tensor([adapters.index(a) for a in layout]))
        assert sel.shape == (len(layout), len(adapters) * 8)          # ranks 8, 8, 4: padded to 8
        with stack.rows(sel), torch.no_grad():
            got = model(**batch).logits
        for a in adapters:
            rows = [i for i, x in enumerate(layout) if x == a]
            assert torch.allclose(got[rows], _single(model, a, batch, rows), atol=1e-5, rtol=1e-5)
        with torch.no_grad():   # PEFT's own mixed batch agrees; outside rows() PEFT's forward runs
            peft_mixed = model(**batch, adapter_names=layout).logits
            assert torch.equal(model(**batch).logits, before)
        assert torch.allclose(got, peft_mixed, atol=1e-5, rtol=1e-5)
    finally:
        stack.close()
    assert not any("forward" in vars(m) for m in model.modules())


def test_stacked_mix_equals_peft_weighted_adapter(three_adapters):
    """A mixing selector is delta W = sum_k w_k s_k B_k A_k: PEFT's add_weighted_adapter (cat)."""
    from elrea.ensemble import mix_in_layers

    model, adapters = three_adapters
    w = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    batch = _batch(2, seed=3)
    names = mix_in_layers(model, w, adapters)
    try:
        ref = torch.cat([_single(model, n, batch, [i]) for i, n in enumerate(names)])
    finally:
        for n in names:
            model.delete_adapter(n)
        model.set_adapter("default")
    stack = fastlora.Stacked(model, adapters)
    try:
        with stack.rows(stack.mix(w)), torch.no_grad():
            got = model(**batch).logits
    finally:
        stack.close()
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_unsupported_adapters_fall_back_to_peft_mixed_batches(tiny_model_dir):
    """LoRA on the embeddings is not a linear layer: generate() must use PEFT's mixed-batch path
    and still match the naive ensemble."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    from elrea.config import ModelConfig
    from elrea.models import load_backbone

    torch.manual_seed(0)
    cfg = dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    model = get_peft_model(load_backbone(ModelConfig(name=str(tiny_model_dir))), PeftLora(**cfg), adapter_name="x")
    model.add_adapter("y", PeftLora(**cfg))
    for n, p in model.named_parameters():
        if "lora_B" in n or "lora_embedding_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    model.eval()
    assert not fastlora.supported(model, ["x", "y"])
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    w = torch.tensor([[0.25, 0.75], [0.6, 0.4]])
    from elrea.engine import Ensemble

    engine = Ensemble(model, ["x", "y"], pad_id=0)
    got = engine.generate(prompts, w, max_new_tokens=5)
    assert engine.stack is None
    for p, row, toks in zip(prompts, w, got):
        ids = list(p)
        for _ in range(5):
            logits = 0
            for name, wc in zip(["x", "y"], row.tolist()):
                model.set_adapter(name)
                with torch.no_grad():
                    logits = logits + wc * model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        assert toks == ids[len(p):]


def test_untested_peft_versions_fall_back(monkeypatch):
    """Stacked LoRA reads PEFT internals: outside the tested range it is not used."""
    import peft

    from elrea import fastlora

    assert fastlora.peft_tested()  # the installed PEFT is a tested one (CI installs from pyproject)
    monkeypatch.setattr(peft, "__version__", "0.30.0")
    assert not fastlora.peft_tested()
    monkeypatch.setattr(peft, "__version__", "0.20.1")
    assert not fastlora.peft_tested()


def test_adapters_off_is_peft_disable_adapter_without_its_cost(three_adapters, monkeypatch):
    """The backbone's forward with adapters off (the learned router's signal): the same logits as
    PEFT's disable_adapter(), which is not called; adapters are back after it, after an error too,
    and a merged model takes PEFT's way (flipping the flag would leave merged weights in)."""
    model, _ = three_adapters
    ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        assert not torch.allclose(on, reference, atol=1e-3)        # the adapters do change the output
        calls = []
        real = type(model).disable_adapter
        monkeypatch.setattr(type(model), "disable_adapter", lambda self: calls.append(1) or real(self))
        with fastlora.adapters_off(model):
            off = model(input_ids=ids).logits
        assert torch.equal(off, reference) and not calls
        with pytest.raises(RuntimeError), fastlora.adapters_off(model):
            raise RuntimeError("stopped early, as the learned router's hook does")
        assert torch.equal(model(input_ids=ids).logits, on)
        model.merge_adapter()
        try:
            with fastlora.adapters_off(model):
                merged_off = model(input_ids=ids).logits
        finally:
            model.unmerge_adapter()
        assert calls and torch.allclose(merged_off, reference, atol=1e-5)
        assert torch.allclose(model(input_ids=ids).logits, on, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [fastlora.CHUNK_ROWS, 5])
def test_stacked_rows_in_bf16_are_bitwise_peft(tiny_model_dir, monkeypatch, chunk_rows):
    """A bf16 backbone with float32 LoRA: PEFT adds the float32 delta to the upcast base output
    and rounds once; so must the stack (rounding the delta to bf16 first drifted from PEFT's
    tokens on the GPU run). Bitwise equal logits on the CPU, whole or a block of rows at a time
    (a prefill's rows: 5 here, so that blocks end mid-sequence and the last is short)."""
    monkeypatch.setattr(fastlora, "CHUNK_ROWS", chunk_rows)
    from peft import get_peft_model

    from elrea.config import LoraConfig, ModelConfig
    from elrea.models import load_backbone, peft_lora_config

    torch.manual_seed(0)
    model = get_peft_model(load_backbone(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16")),
                           peft_lora_config(LoraConfig()))
    model.add_adapter("b", peft_lora_config(LoraConfig()))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    model.eval()
    batch = _batch(4, seed=5)
    refs = {a: _single(model, a, batch, list(range(4))) for a in ("default", "b")}
    assert refs["b"].dtype == torch.bfloat16
    stack = fastlora.Stacked(model, ["default", "b"])
    try:
        with stack.rows(stack.select(torch.tensor([0, 0, 1, 1]))), torch.no_grad():
            got = model(**batch).logits
    finally:
        stack.close()
    assert torch.equal(got[:2], refs["default"][:2]) and torch.equal(got[2:], refs["b"][2:])
