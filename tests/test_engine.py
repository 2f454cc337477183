"""The decoding engine (elrea.engine): slots on a static cache, requests that join and leave,
the compiled step, against PEFT's own generate and against each request decoded alone."""

import logging

import pytest
import torch

from elrea.engine import Ensemble, PoolFull, bucket
from elrea.ensemble import sampling

from conftest import lora_model

NAMES = ["default", "b", "c"]


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    """The tiny backbone with three LoRA adapters (random non-zero B)."""
    from elrea.config import LoraConfig
    from elrea.models import peft_lora_config

    model = lora_model(tiny_model_dir, seed=0)
    for name in NAMES[1:]:
        model.add_adapter(name, peft_lora_config(LoraConfig()))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.fixture
def engine(peft_model):
    e = Ensemble(peft_model, NAMES, pad_id=0)
    yield e
    e.close()


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _weights(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, len(NAMES), generator=g)
    w[0, 1] = 0.0                                   # a zero weight: that adapter takes no slot
    return w / w.sum(1, keepdim=True)


def _peft_generate(model, adapter, prompt, n):
    model.set_adapter(adapter)
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    model.set_adapter(NAMES[0])
    return out[0, len(prompt):].tolist()


def test_one_hot_equals_peft_generate_for_every_adapter(engine, peft_model):
    prompts = _prompts(3)
    for c, name in enumerate(NAMES):
        got = engine.generate(prompts, engine.one_hot(name, 3), max_new_tokens=10)
        assert got == [_peft_generate(peft_model, name, p, 10) for p in prompts]


def test_requests_that_join_and_leave_decode_as_if_alone(engine):
    """Continuous batching: a request's tokens do not depend on who else is in the pool, when it
    joined, or who left meanwhile."""
    prompts, w = _prompts(4, seed=2), _weights(4, seed=2)
    alone = [engine.generate([p], w[i:i + 1], max_new_tokens=6 + 3 * i)[0] for i, p in enumerate(prompts)]
    pool = engine.slots(8, 64, fresh=True)
    got, seqs = {}, {}

    def add(i):
        seqs[i] = pool.add(prompts[i], w[i], sampling(max_new_tokens=6 + 3 * i), tag=i)

    add(0)
    add(1)
    step = 0
    while pool.live() or len(seqs) < 4:
        if step == 2:
            add(2)                     # joins while 0 and 1 decode
        if step == 12 and 3 not in seqs:
            add(3)                     # joins after 0 and 1 left (their slots reused)
        for events in pool.step(1):
            for seq, tok, reason in events:
                got.setdefault(seq.tag, []).append(tok)
        step += 1
    assert [got[i] for i in range(4)] == alone
    assert len(pool.free_rows) == pool.n and not pool.live()


def test_slots_are_freed_when_a_request_ends_and_refused_when_full(engine):
    pool = engine.slots(4, 64, fresh=True)
    w3 = torch.tensor([0.2, 0.3, 0.5])
    a = pool.add([5, 6, 7], w3, sampling(max_new_tokens=2))            # 3 slots
    with pytest.raises(PoolFull):
        pool.add([5, 6], w3, sampling(max_new_tokens=2))                # 3 more do not fit in 1
    b = pool.add([8, 9], torch.tensor([0.0, 1.0, 0.0]), sampling(max_new_tokens=6))   # top-1: one slot
    assert len(pool.free_rows) == 0
    pool.step(1)                                                        # prefill: first tokens
    pool.step(1)                                                        # a ends (2 tokens)
    assert a.done and a.reason == "length" and not b.done
    assert len(pool.free_rows) == 3                                     # a's slots, at once
    pool.cancel(b)
    (events,) = pool.step(1)
    assert events == [(b, None, "cancelled")] and len(pool.free_rows) == 4
    with pytest.raises(ValueError, match="does not fit"):
        pool.add(list(range(3, 63)), w3, sampling(max_new_tokens=8))


def test_the_cache_is_static_and_the_pool_reused(engine):
    prompts, w = _prompts(3, seed=4), _weights(3, seed=4)
    engine.generate(prompts, w, max_new_tokens=4)
    pool = engine._pool
    ptrs = [t.data_ptr() for t in pool.cache.keys + pool.cache.values]
    shapes = {tuple(t.shape) for t in pool.cache.keys}
    assert shapes == {(bucket(8), 2, 64, 8)}                   # 8 rows -> 8 slots, 2 KV heads, head dim 8
    engine.generate(prompts, w, max_new_tokens=20)              # longer: same bucket, same tensors
    assert engine._pool is pool
    assert [t.data_ptr() for t in pool.cache.keys + pool.cache.values] == ptrs


def test_sync_every_stream_eos_and_stop_strings_give_the_same_tokens(engine, peft_model):
    prompts, w = _prompts(3, seed=5), _weights(3, seed=5)
    ref = engine.generate(prompts, w, max_new_tokens=12)
    eos = ref[1][4]                                             # a token prompt 1 produces: stops it there
    base = engine.generate(prompts, w, sampling(max_new_tokens=12, eos_ids=[eos]))
    assert base[1] == ref[1][:ref[1].index(eos)]
    engine.cpu_syncs_every_step = False                         # chunks of sync_every steps, as on a GPU
    for sync in (1, 3, 32):
        engine.sync_every = sync
        assert engine.generate(prompts, w, sampling(max_new_tokens=12, eos_ids=[eos])) == base
    streamed = []
    engine.generate(prompts, w, sampling(max_new_tokens=12, eos_ids=[eos]),
                    on_token=lambda b, t: streamed.append((b, t)))
    assert [[t for b, t in streamed if b == i] for i in range(3)] == base


def test_sampling_is_seeded_and_independent_of_syncs(engine):
    prompts, w = _prompts(3, seed=6), _weights(3, seed=6)

    engine.cpu_syncs_every_step = False

    def draw(sync):
        engine.sync_every = sync
        return engine.generate(prompts, w, sampling(0.9, 0.9, 10, [], torch.Generator().manual_seed(3)))

    assert draw(1) == draw(8)
    assert draw(8) != engine.generate(prompts, w, max_new_tokens=10)


def test_compiled_step_equals_eager_and_recompiles_are_counted(peft_model):
    """Traced by dynamo (backend 'eager': no code generation, seconds): same tokens; one compile
    per (slots, length) bucket, none for a call in a bucket already seen."""
    prompts, w = _prompts(3, seed=7), _weights(3, seed=7)
    eager = Ensemble(peft_model, NAMES, pad_id=0, compile="off")
    ref = eager.generate(prompts, w, max_new_tokens=8)
    eager.close()
    eng = Ensemble(peft_model, NAMES, pad_id=0, compile="dynamo")
    try:
        assert eng.generate(prompts, w, max_new_tokens=8) == ref
        assert eng.generate(prompts, w, max_new_tokens=8) == ref
        assert eng.stats.compiled == [(8, 64)] and eng.stats.fallback is None
        eng.generate(prompts[:1], w[:1], max_new_tokens=8)          # 2 rows -> another bucket
        assert eng.stats.compiled == [(8, 64), (2, 64)]
    finally:
        eng.close()


def test_a_failing_compile_falls_back_to_eager_and_says_so_once(peft_model, monkeypatch, caplog):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    prompts, w = _prompts(2, seed=8), _weights(2, seed=8)
    eng = Ensemble(peft_model, NAMES, pad_id=0, compile="default")
    try:
        with caplog.at_level(logging.WARNING, logger="elrea.engine"):
            first = eng.generate(prompts, w, max_new_tokens=5)
            eng.generate(prompts, w, max_new_tokens=5)
        assert [r for r in caplog.records if "decoding eagerly" in r.message].__len__() == 1
        assert "no C++ compiler" in eng.stats.fallback
    finally:
        eng.close()
    eager = Ensemble(peft_model, NAMES, pad_id=0, compile="off")
    try:
        assert eager.generate(prompts, w, max_new_tokens=5) == first
    finally:
        eager.close()


def test_an_extra_adapter_is_there_only_inside(engine, peft_model, tmp_path):
    peft_model.save_pretrained(str(tmp_path), selected_adapters=["c"])
    prompts = _prompts(2, seed=9)
    with engine.extra_adapter(tmp_path / "c", "extra") as name:
        assert engine.names == NAMES + ["extra"]
        got = engine.generate(prompts, engine.one_hot(name, 2), max_new_tokens=6)
        assert got == engine.generate(prompts, engine.one_hot("c", 2), max_new_tokens=6)
    assert engine.names == NAMES and "extra" not in peft_model.peft_config
    assert engine.generate(prompts, engine.one_hot("b", 2), max_new_tokens=6) == \
        [_peft_generate(peft_model, "b", p, 6) for p in prompts]


def test_arrow_equals_peft_create_arrow_model(engine, peft_model, tiny_model_dir, tmp_path):
    """PEFT's Arrow routing over the loaded adapters, through the engine, gives the tokens that
    PEFT's own create_arrow_model + generate give on the same adapter folders."""
    from peft import ArrowConfig, create_arrow_model

    from elrea.config import ModelConfig
    from elrea.models import load_backbone

    peft_model.save_pretrained(str(tmp_path))
    folders = [str(tmp_path if n == "default" else tmp_path / n) for n in NAMES]
    prompts = _prompts(3, seed=12)
    with engine.arrow(NAMES, top_k=2, seed=0) as name:
        assert engine.names == NAMES + [name] and engine.stack is None      # PEFT's forward, mixed batches
        got = engine.generate(prompts, engine.one_hot(name, 3), max_new_tokens=6)
    assert engine.names == NAMES and name not in peft_model.peft_config
    ref_model = create_arrow_model(load_backbone(ModelConfig(name=str(tiny_model_dir))), folders,
                                   ArrowConfig(top_k=2, rng_seed=0)).eval()
    ref = []
    for p in prompts:
        ids = torch.tensor([p])
        out = ref_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        ref.append(out[0, len(p):].tolist())
    assert got == ref
    # Arrow is not any one adapter: it differs from each of them on some prompt
    assert all(got != engine.generate(prompts, engine.one_hot(n, 3), max_new_tokens=6) for n in NAMES)
    with pytest.raises(ValueError, match="not loaded"):
        with engine.arrow(["nope"]):
            pass


def test_unknown_compile_setting_lists_the_valid_ones(peft_model):
    with pytest.raises(ValueError, match="reduce-overhead"):
        Ensemble(peft_model, NAMES, pad_id=0, compile="fast")


def test_an_almost_empty_pool_decodes_only_its_busy_slots_and_columns(engine):
    """One request of one row in a 16 x 256 pool: eagerly, the step covers slot 0 and exactly the
    columns written so far; a compiled step rounds them up (the first 64 columns, then the next
    power of two as the answer grows); same tokens as alone."""
    prompt, w = _prompts(1, seed=10)[0], engine.one_hot("b", 1)[0]
    alone = engine.generate([prompt], w[None], max_new_tokens=70)[0]
    pool = engine.slots(16, 256, fresh=True)
    seq = pool.add(prompt, w, sampling(max_new_tokens=70))
    got, spans, eager = [], set(), []
    while pool.live():
        for events in pool.step(1):
            got += [tok for s, tok, _ in events if s is seq]
        if pool.live():
            eager.append(pool._busy())
            spans.add(pool._busy(compiled=True))   # what a compiled step would cover
    assert got == alone
    assert eager == [(1, len(prompt) + k) for k in range(1, len(eager) + 1)]   # one column more each step
    assert spans == {(1, 64), (1, 128)}


def test_a_freed_slot_below_a_running_one_is_not_written_past_the_busy_columns(engine):
    """Slot 0 ends a long answer while slot 2's young request still needs few columns (slot 1
    runs on, so the busy prefix is more than half full and nothing moves): the free slot must
    stay out of the step (it once kept advancing its column past the busy span)."""
    w = engine.one_hot("c", 1)[0]
    first, second, third = _prompts(3, seed=11)
    late = engine.generate([second], w[None], max_new_tokens=40)[0]
    pool = engine.slots(16, 256, fresh=True)
    a = pool.add(first, w, sampling(max_new_tokens=100))
    c = pool.add(third, w, sampling(max_new_tokens=130))
    got, step = [], 0
    while pool.live():
        if step == 75:
            b = pool.add(second, w, sampling(max_new_tokens=40))
        for events in pool.step(1):
            got += [tok for s, tok, _ in events if step >= 75 and s is b]
        step += 1
    assert a.rows == [0] and b.rows == [2] and got == late
    assert c.rows == [0] and engine.stats.moves == 1  # c moved down only once b had finished too


def test_a_static_batch_frees_finished_rows_and_moves_running_ones_down(engine):
    """The requests that finish at the first host sync give their rows up; the one still running
    moves to the slots below, so each later step computes its rows alone; same tokens."""
    prompts, w = _prompts(4, seed=16), _weights(4, seed=16)
    specs = [sampling(max_new_tokens=2)] * 3 + [sampling(max_new_tokens=20)]
    alone = [engine.decode([p], w[i:i + 1], specs[i])[0].ids for i, p in enumerate(prompts)]
    before = engine.stats.decode_rows
    got = engine.decode(prompts, w, specs)
    assert [d.ids for d in got] == alone
    rows, last = int((w > 0).sum()), int((w[3] > 0).sum())
    # a CPU syncs every step: the second token's step is the last with every row, then 18 steps
    # of the last prompt's rows alone (and no step after its 20th token)
    assert engine.stats.decode_rows - before == rows + 18 * last
    assert engine.stats.moves == last
    engine.cpu_syncs_every_step = False             # in chunks of 8 (a GPU's): rows freed at the first sync
    before = engine.stats.decode_rows
    assert [d.ids for d in engine.decode(prompts, w, specs)] == alone
    first = engine.sync_every - 1                   # decode steps before the first sync (the prefill is one)
    assert engine.stats.decode_rows - before == first * rows + (3 * engine.sync_every - 1 - first) * last


# ----------------------------------------------------------------------------- shared rows

def _routings(n_prompts, seed):
    """Several routings of the same prompts: two dense ones, a top-1 on each adapter, one that
    leaves an adapter out; as compare's trials of one run are."""
    g = torch.Generator().manual_seed(seed)
    sets = [torch.softmax(torch.randn(n_prompts, len(NAMES), generator=g) * t, 1) for t in (1.0, 3.0)]
    sets += [torch.nn.functional.one_hot(torch.full((n_prompts,), c), len(NAMES)).float() for c in range(len(NAMES))]
    part = torch.rand(n_prompts, len(NAMES), generator=g)
    part[:, 1] = 0.0
    return sets + [part / part.sum(1, keepdim=True)]


def test_routings_of_the_same_prompts_share_rows_and_decode_as_if_alone(engine):
    """One call with every routing of the same prompts gives each the tokens it gets alone; it
    prefills each (prompt, adapter) row once and decodes no more rows; the parting rows forked.
    (The tiny model's random adapters disagree at once, so most rows fork early here.)"""
    prompts, sets = _prompts(3, seed=11), _routings(3, seed=11)
    alone, decoded_alone = [], 0
    for w in sets:
        before = engine.stats.decode_rows
        alone.append(engine.generate(prompts, w, max_new_tokens=12))
        decoded_alone += engine.stats.decode_rows - before
    prefill_rows, decode_rows = engine.stats.prefill_rows, engine.stats.decode_rows
    got = engine.generate(prompts * len(sets), torch.cat(sets), max_new_tokens=12)
    assert [got[i * 3:(i + 1) * 3] for i in range(len(sets))] == alone
    assert engine.stats.prefill_rows - prefill_rows == 3 * len(NAMES)       # each (prompt, adapter) once
    assert engine.stats.decode_rows - decode_rows <= decoded_alone
    assert engine.stats.forks > 0                       # the routings did part somewhere
    assert len({str(a) for a in alone}) > 1             # ... and decoded different text


def test_routings_that_choose_alike_decode_each_row_once(engine):
    """Two routings that pick the same tokens (weights a little apart) never fork: the call
    computes the rows of one of them."""
    prompts, w = _prompts(3, seed=15), _weights(3, seed=15)
    near = torch.softmax(torch.log(w) * 1.02, 1) * (w > 0)
    alone = [engine.generate(prompts, x, max_new_tokens=10) for x in (w, near)]
    assert alone[0] == alone[1]
    before = engine.stats.decode_rows
    engine.generate(prompts, w, max_new_tokens=10)
    one = engine.stats.decode_rows - before
    before = engine.stats.decode_rows
    assert engine.generate(prompts * 2, torch.cat([w, near]), max_new_tokens=10) == alone[0] * 2
    assert engine.stats.decode_rows - before == one and engine.stats.forks == 0


def test_a_fork_with_no_free_slot_grows_the_pool_and_changes_nothing(engine):
    prompts = _prompts(2, seed=12)
    g = torch.Generator().manual_seed(12)
    sets = [torch.softmax(torch.randn(2, len(NAMES), generator=g) * 4, 1) for _ in range(12)]
    alone = [engine.generate(prompts, w, max_new_tokens=16) for w in sets]
    got = engine.generate(prompts * len(sets), torch.cat(sets), max_new_tokens=16)
    pool = engine._pool
    assert pool.n > bucket(2 * len(NAMES))               # started with the 6 distinct rows' bucket, grew
    assert [got[i * 2:(i + 1) * 2] for i in range(len(sets))] == alone
    grown = pool.n
    assert engine.generate(prompts * len(sets), torch.cat(sets), max_new_tokens=16) == got
    assert engine._pool is pool and pool.n == grown      # the next such call reuses the grown pool


def test_requests_that_share_rows_but_sample_or_stop_apart_are_decoded_as_if_alone(engine):
    """Sharing is by prompt: requests with other decodings (a seed, an EOS, a length) fork when
    their tokens part, and a finished request leaves its rows to the others."""
    prompt, w = _prompts(1, seed=13)[0], _weights(2, seed=13)[1:2]
    eos = engine.generate([prompt], w, max_new_tokens=12)[0][3]

    def specs():
        draw = lambda seed: sampling(0.9, 1.0, 10, [], torch.Generator().manual_seed(seed))  # noqa: E731
        return [draw(1), draw(2), sampling(max_new_tokens=12, eos_ids=[eos]), sampling(max_new_tokens=3),
                sampling(max_new_tokens=12)]

    alone = [engine.decode([prompt], w, s)[0].ids for s in specs()]
    got = [d.ids for d in engine.decode([prompt] * 5, w.repeat(5, 1), specs())]
    assert got == alone
    assert alone[2][-1] == eos and len(alone[3]) == 3 and len(alone[4]) == 12


def test_shared_rows_on_the_compiled_step_get_their_room_at_once(peft_model):
    """A compiled step's pool never grows (its graphs are for its tensors): it starts with room
    for share_growth times the distinct rows, and requests that part past it wait; same tokens."""
    prompts, sets = _prompts(2, seed=14), _routings(2, seed=14)
    eager = Ensemble(peft_model, NAMES, pad_id=0, compile="off")
    ref = eager.generate(prompts * len(sets), torch.cat(sets), max_new_tokens=8)
    eager.close()
    eng = Ensemble(peft_model, NAMES, pad_id=0, compile="dynamo")
    try:
        assert eng.generate(prompts * len(sets), torch.cat(sets), max_new_tokens=8) == ref
        every, distinct = int((torch.cat(sets) > 0).sum()), 2 * len(NAMES)
        assert eng._pool.n == bucket(2 * distinct) < bucket(every) and eng.stats.fallback is None
    finally:
        eng.close()


def test_when_the_pool_may_not_grow_parting_requests_wait_and_go_on_from_their_tokens(engine):
    """share_growth=1: a fork with no free slot defers the requests that part; each goes on
    later from its prompt and tokens so far, and ends with the tokens it gets alone."""
    prompts = _prompts(2, seed=12)
    g = torch.Generator().manual_seed(12)
    sets = [torch.softmax(torch.randn(2, len(NAMES), generator=g) * 4, 1) for _ in range(12)]
    alone = [engine.generate(prompts, w, max_new_tokens=16) for w in sets]
    engine.share_growth = 1
    engine._pool = None
    prefills = engine.stats.prefills
    try:
        got = engine.decode(prompts * len(sets), torch.cat(sets), sampling(max_new_tokens=16))
    finally:
        engine.share_growth = 2
    assert engine._pool.n == bucket(2 * len(NAMES))      # never grew
    assert [[d.text_ids for d in got[i * 2:(i + 1) * 2]] for i in range(len(sets))] == alone
    assert {d.reason for d in got} == {"length"}
    assert engine.stats.prefills - prefills > 1          # the deferred ones came back in later prefills


def test_the_lm_head_gets_contiguous_rows_and_the_hook_leaves_with_close(peft_model):
    """A prefill keeps the last position's logits: transformers hands the LM head a strided
    view, which torch multiplies batch by batch over an expanded weight (slow on a CPU). The
    engine makes it contiguous while it owns the model, and only then; the tokens stay PEFT's."""
    head = peft_model.get_output_embeddings()
    hooks_before = len(head._forward_pre_hooks)
    seen = []
    spy = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    try:
        eng = Ensemble(peft_model, NAMES, pad_id=0)
        prompts = _prompts(3, seed=4)
        got = eng.generate(prompts, eng.one_hot("b", 3), max_new_tokens=4)
        assert seen and all(seen)
        assert got == [_peft_generate(peft_model, "b", p, 4) for p in prompts]
        eng.close()
        assert len(head._forward_pre_hooks) == hooks_before
        seen.clear()
        _peft_generate(peft_model, "b", prompts[0] + prompts[1], 1)   # a strided view, without the engine
        with torch.no_grad():
            peft_model(input_ids=torch.tensor([prompts[0][:2], prompts[1][:2]]), logits_to_keep=1)
        assert False in seen                                          # the hook really is gone
    finally:
        spy.remove()
