"""Loading backbones (elrea.models) in every precision: bfloat16 backbones with float32 LoRA, and 4-/8-bit QLoRA through bitsandbytes.

bitsandbytes >= 0.46 quantizes on the CPU too, so QLoRA runs here for real (slowly); on a
GPU the same code takes the CUDA kernels.
"""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST
from elrea.config import LoraConfig, ModelConfig, load_config
from elrea.data import PromptFormatter, collate, parse_record
from elrea.errors import ModelError
from elrea.features import per_example_gradients, per_example_loss
from elrea.models import load_backbone, load_tokenizer, peft_lora_config


def _encoded(model_dir, rows, n=5):
    tok = load_tokenizer(ModelConfig(name=str(model_dir)))
    fmt = PromptFormatter(tok)
    recs = [parse_record(r, dict(path="t", line=i)) for i, r in enumerate(rows[:n])]
    for i, r in enumerate(recs):
        r.messages[-1]["content"] += " please" * (2 * i)
    return tok, [fmt.encode_instruction(r.messages) for r in recs]


def _lora(model_dir, dtype="float32", quantization="none", state=None):
    from peft import get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    backbone = load_backbone(ModelConfig(name=str(model_dir), dtype=dtype, quantization=quantization), "cpu")
    model = get_peft_model(backbone, peft_lora_config(LoraConfig()))
    if state is None:
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
    else:
        set_peft_model_state_dict(model, state)
    return model.eval()


def _autograd_rows(model, enc, pad_id):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for e in enc:
        b = collate([e], pad_id)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = per_example_loss(out.logits, b["labels"]).sum()
        rows.append(torch.cat([g.reshape(-1).float() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_bf16_per_example_gradients_agree_with_float32_autograd(tiny_model_dir, toy_rows):
    from peft import get_peft_model_state_dict

    tok, enc = _encoded(tiny_model_dir, toy_rows)
    ref_model = _lora(tiny_model_dir)
    bf16 = _lora(tiny_model_dir, "bfloat16", state=get_peft_model_state_dict(ref_model))
    assert {p.dtype for n, p in bf16.named_parameters() if "lora_" in n} == {torch.float32}
    assert bf16.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    G = per_example_gradients(bf16, collate(enc, tok.pad_token_id))
    R = _autograd_rows(ref_model, enc, tok.pad_token_id)
    assert G.dtype == torch.float32
    cos = F.cosine_similarity(G, R, dim=1)
    assert cos.min() >= 0.99, cos


def test_bf16_fit_generate_score(tmp_path, tiny_model_dir, toy_data):
    from safetensors import safe_open

    from elrea import ELREA
    from elrea.pipeline import fit

    run = fit(toy_data / "train.jsonl", tmp_path / "run",
              load_config(None, [f"model.name={tiny_model_dir}", *FAST, "clustering.num_clusters=2",
                                 "model.dtype=bfloat16"]))
    with safe_open(str(run / "base" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # LoRA weights stay float32
    m = ELREA.from_pretrained(run, device="cpu")
    assert next(m.model.parameters()).dtype == torch.bfloat16
    texts = m.generate(["Add 2 and 3.", "Reverse the word abc."], max_new_tokens=4)
    assert len(texts) == 2
    w = torch.zeros(1, len(m.adapters))
    w[0, 1] = 1.0
    scores = m.score("Add 2 and 3.", ["5", "6 7"], weights=w)
    assert all(s < 0 and s == s for s in scores)
    # the ensemble with one adapter at weight 1 is that adapter alone (bf16 logits, float32 sums)
    ids = m.prompt_ids("Add 2 and 3.") + m.tokenizer("5", add_special_tokens=False)["input_ids"]
    m.model.set_adapter("expert_1")
    with torch.no_grad():
        logits = m.model(input_ids=torch.tensor([ids])).logits[0].float()
    m.model.set_adapter("base")
    n = len(ids) - len(m.prompt_ids("Add 2 and 3."))
    logp = torch.log_softmax(logits, -1)[len(ids) - n - 1:len(ids) - 1]
    expected = float(logp.gather(1, torch.tensor(ids[-n:])[:, None]).sum())
    assert abs(scores[0] - expected) < 2e-2 * max(1.0, abs(expected))


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_per_example_gradients_are_exact(tiny64_model_dir, toy_rows, quantization):
    """On a quantized backbone the LoRA factors are still plain linear layers: exact gradients."""
    tok, enc = _encoded(tiny64_model_dir, toy_rows, n=4)
    model = _lora(tiny64_model_dir, "bfloat16", quantization)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "bnb" in type(layer).__module__, type(layer)
    batch = collate(enc, tok.pad_token_id)
    G = per_example_gradients(model, batch)
    R = _autograd_rows(model, enc, tok.pad_token_id)
    cos = F.cosine_similarity(G, R, dim=1)
    assert cos.min() >= 0.9999, cos
    # a forward without gradients (what decoding does) must not change them: bitsandbytes repacks
    # 4-bit CPU weights for inference into a format with no backward unless told not to
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :1])
        model(input_ids=batch["input_ids"])
    assert torch.allclose(per_example_gradients(model, batch), G, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_qlora_fit_generate_score(tmp_path, tiny64_model_dir, toy_data):
    from peft import PeftModel

    from elrea import ELREA, fastlora
    from elrea.pipeline import fit

    run = fit(toy_data / "train.jsonl", tmp_path / "run",
              load_config(None, [f"model.name={tiny64_model_dir}", *FAST, "clustering.num_clusters=2",
                                 "model.quantization=4bit", "model.dtype=bfloat16"]))
    assert json.loads((run / "elrea.json").read_text())["stages"]["experts"]["status"] == "done"
    m = ELREA.from_pretrained(run, device="cpu")
    assert not fastlora.supported(m.model, m.adapters)  # decoding falls back to PEFT mixed batches
    prompt = "Add 2 and 3."
    w = torch.zeros(1, len(m.adapters))
    w[0, 0] = 1.0
    ours = m.generate([prompt], weights=w, max_new_tokens=5)[0]
    ref = PeftModel.from_pretrained(load_backbone(m.config.model, "cpu"), str(run / "base")).eval()
    ids = torch.tensor([m.prompt_ids(prompt)])
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                       eos_token_id=m.tokenizer.eos_token_id, pad_token_id=m.tokenizer.pad_token_id)
    assert ours == m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    scores = m.score(prompt, ["5", "6"])
    assert len(scores) == 2 and all(s < 0 for s in scores)


def test_qlora_without_bitsandbytes_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ModelError, match=r"needs bitsandbytes: pip install 'elrea\[qlora\]'"):
        load_backbone(ModelConfig(name=str(tiny_model_dir), quantization="4bit"), "cpu")


def test_qlora_where_bitsandbytes_cannot_run_is_a_clear_error(tiny_model_dir, monkeypatch):
    import bitsandbytes

    def no_backend(*a, **k):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_backend)
    with pytest.raises(ModelError, match="cannot run on cpu.*needs a CUDA GPU"):
        load_backbone(ModelConfig(name=str(tiny_model_dir), quantization="8bit"), "cpu")


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, tiny_model_dir, toy_data):
    from safetensors.torch import load_file

    from elrea.pipeline import fit

    runs = []
    for gc in ("false", "true"):
        runs.append(fit(toy_data / "train.jsonl", tmp_path / gc,
                        load_config(None, [f"model.name={tiny_model_dir}", *FAST, "base.max_steps=3",
                                           f"base.gradient_checkpointing={gc}"]), until="base"))
    a, b = (load_file(str(r / "base" / "adapter_model.safetensors")) for r in runs)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # an execution setting: switching it does not invalidate the finished stage
    again = fit(toy_data / "train.jsonl", runs[0],
                load_config(None, [f"model.name={tiny_model_dir}", *FAST, "base.max_steps=3",
                                   "base.gradient_checkpointing=true"]), until="base")
    assert json.loads((again / "elrea.json").read_text())["stages"]["base"]["status"] == "done"


def test_single_process_trainer_is_pinned_to_the_models_gpu(monkeypatch, tmp_path):
    """Outside DDP, TrainingArguments would take cuda:0 and every visible GPU (DataParallel)."""
    from transformers import TrainingArguments

    from elrea.training import pin_to_device

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=not torch.cuda.is_available())
    pin_to_device(args, torch.device("cuda", 1))
    assert args.device == torch.device("cuda", 1) and args.n_gpu == 1 and current[-1] == torch.device("cuda", 1)
    cpu_args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    pin_to_device(cpu_args, torch.device("cpu"))
    assert cpu_args.device == torch.device("cpu")
