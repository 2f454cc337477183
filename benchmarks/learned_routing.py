"""python benchmarks/learned_routing.py  -- the learned router's cost per prompt, against one decoded token.

The learned router's signal is the pooled hidden state of a middle decoder layer, the forward
stopped there, with every adapter off. Side by side, in one run, on SmolLM2-135M-Instruct with a
base adapter and 4 experts (LoRA r8 on every linear layer, random B), over reasoning-mix prompts:

- elrea: `hidden_states` as the router runs it (adapters off by flipping the LoRA layers' flag,
  `elrea.fastlora.adapters_off`);
- PEFT's way: the same forward under `model.disable_adapter()` (what elrea did before; PEFT walks
  every module twice and toggles requires_grad on each call);
- one decoded token at batch 1 (greedy, one adapter, KV cache), the unit routing is measured in;
- the outputs of the first two agree exactly (checked).

Batch 1 and the routing batch size (16). `--quick` runs a tiny model (timings mean nothing).
Writes benchmarks/results/learned_routing.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap, "learned_routing")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="the routing batch size")
    return ap.parse_args(argv)


def run(args) -> dict:
    from peft import get_peft_model

    from elrea.config import LoraConfig
    from elrea.data import Encoded
    from elrea.engine import Ensemble
    from elrea.models import peft_lora_config
    from elrea.routers.learned import hidden_states, resolve_layer

    backbone, tok, name = C.load_model(args)
    model = get_peft_model(backbone, peft_lora_config(LoraConfig(rank=8)), adapter_name="base")
    for c in range(1, args.experts + 1):
        model.add_adapter(f"expert_{c}", peft_lora_config(LoraConfig(rank=8)))
    C.randomize_lora_b(model, 0.02, args.seed)
    model.eval()
    texts, origin = C.instructions(args.prompts, "train", args.seed, args.quick)
    enc = []
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        enc.append(Encoded(list(ids), list(ids)))
    layer, pad = resolve_layer(model, -1), tok.pad_token_id
    dev = torch.device(args.device)

    def signal(batch, context):              # one router call per batch, as `ELREA.route` makes it
        out = []
        for s in range(0, len(enc), batch):
            with context():
                out.append(hidden_states(model, enc[s:s + batch], layer, "mean", pad, batch))
        return out

    ways = {"elrea": contextlib.nullcontext,    # hidden_states switches adapters off itself
            "peft_disable_adapter": model.disable_adapter}
    out = {"model": name, "prompts": origin, "n": len(enc), "layer": layer,
           "mean_prompt_tokens": sum(len(e.input_ids) for e in enc) / len(enc), "batches": {}}
    for batch in (1, args.batch):
        res = {}
        for way, context in ways.items():
            C.log(f"batch {batch}: {way} ...")
            sec, _, H = C.timed(lambda: (signal(batch, context), C.sync(dev))[0], args.repeats)
            res[way] = {"ms_per_prompt": 1000 * sec / len(enc), "H": torch.cat(H)}
        res["equal"] = torch.equal(res["elrea"].pop("H"), res["peft_disable_adapter"].pop("H"))
        res["speedup"] = res["peft_disable_adapter"]["ms_per_prompt"] / res["elrea"]["ms_per_prompt"]
        out["batches"][str(batch)] = res
    model.set_adapter("base")
    C.log("one decoded token at batch 1 ...")
    engine = Ensemble(model, ["base"] + [f"expert_{c}" for c in range(1, args.experts + 1)], pad)
    out["ms_per_decoded_token_batch1"] = statistics.median(
        engine.decoded_token_ms([e.input_ids for e in enc[:8]]) for _ in range(max(1, args.repeats)))
    for res in out["batches"].values():
        for way in ("elrea", "peft_disable_adapter"):
            res[way]["x_one_token"] = res[way]["ms_per_prompt"] / out["ms_per_decoded_token_batch1"]
    return out


def show(report: dict):
    rows = []
    for b, res in report["batches"].items():
        for way in ("elrea", "peft_disable_adapter"):
            rows.append([f"batch {b}: " + ("elrea (adapters_off)" if way == "elrea" else "PEFT disable_adapter()"),
                         res[way]["ms_per_prompt"], res[way]["x_one_token"],
                         res["speedup"] if way == "elrea" else 1.0, res["equal"]])
    C.print_table(f"learned router signal, {report['model']}, layer {report['layer']}, "
                  f"{report['n']} prompts ({report['mean_prompt_tokens']:.0f} tokens)",
                  ["method", "ms/prompt", "x one token", "speedup", "equal"], rows,
                  [f"one decoded token at batch 1: {report['ms_per_decoded_token_batch1']:.1f} ms",
                   C.machine_note(report)])


def main(argv=None):
    return C.run_benchmark("learned_routing", parse_args, run, show, argv)


if __name__ == "__main__":
    main()
