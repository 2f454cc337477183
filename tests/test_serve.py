"""`elrea serve`: a real server process on a free loopback port, driven by the real `openai` client."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import http.client
import urllib.error
import urllib.request
from urllib.parse import urlparse

import openai
import pytest
import torch

KEY = "sk-elrea-test"
PROMPTS = ["Add 3 and 4.", "Reverse the word hello.", "Subtract 2 from 9.", "Uppercase the word kiwi.",
           "Add 10 and 5.", "Reverse the word abc.", "Subtract 1 from 1.", "Uppercase the word pear please."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, headers=None):
    """(status, JSON body) of a GET, with the standard library (no HTTP client dependency)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post_raw(url, body: bytes, headers):
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _start(run, *extra):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "elrea.cli", "serve", str(run), "--port", str(port),
                             "--api-key", KEY, "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        try:
            if _get(base + "/health")[0] == 200:
                return proc, base
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not come up in 60 s")


@pytest.fixture(scope="module")
def server(fitted_run):
    proc, base = _start(fitted_run)
    yield base, fitted_run.name
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_and_health(client, server, elrea_model):
    base, name = server
    assert [m.id for m in client.models.list().data] == [name]
    h = _get(base + "/health")[1]
    assert h["status"] == "ok" and h["model"] == name


def test_greedy_completion_and_chat_equal_elrea_generate(client, server, elrea_model):
    _, name = server
    m = elrea_model
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8)
    assert r.choices[0].text == m.generate([PROMPTS[0]], raw=True, max_new_tokens=8)[0]
    assert r.usage.prompt_tokens == len(m.encode(PROMPTS[0], raw=True)[0].input_ids)
    assert r.usage.completion_tokens >= len(m.tokenizer(r.choices[0].text, add_special_tokens=False)["input_ids"])
    ext = r.model_extra["elrea"]
    assert ext["adapters"] == m.adapters and abs(sum(ext["weights"]) - 1) < 1e-4
    assert torch.allclose(torch.tensor(ext["weights"]), m.route(m.encode(PROMPTS[0], raw=True))[0], atol=1e-5)

    messages = [{"role": "user", "content": PROMPTS[1]}]
    c = client.chat.completions.create(model=name, messages=messages, max_tokens=8)
    assert c.choices[0].message.content == m.generate([messages], max_new_tokens=8)[0]
    assert c.choices[0].message.role == "assistant" and c.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming(client, server):
    _, name = server
    full = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=10).choices[0].text
    chunks = list(client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[0].model_extra["elrea"]["weights"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices

    messages = [{"role": "user", "content": PROMPTS[3]}]
    full = client.chat.completions.create(model=name, messages=messages, max_tokens=10).choices[0].message.content
    parts = list(client.chat.completions.create(model=name, messages=messages, max_tokens=10, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == full


def test_weights_override_and_stop_sequences(client, server, elrea_model):
    _, name = server
    m = elrea_model
    k = len(m.adapters)
    one_hot = [0.0] * k
    one_hot[1] = 1.0
    r = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=8, extra_body={"elrea": {"weights": one_hot}})
    w = torch.tensor([one_hot])
    assert r.choices[0].text == m.generate([PROMPTS[4]], weights=w, raw=True, max_new_tokens=8)[0]
    assert r.model_extra["elrea"]["weights"] == one_hot and r.model_extra["elrea"]["router"] == "fixed"
    uniform = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=2,
                                        extra_body={"elrea": {"router": "uniform"}})
    assert uniform.model_extra["elrea"]["weights"] == pytest.approx([1 / k] * k, abs=1e-5)
    # a stop sequence: the text ends before it, finish_reason "stop"
    sampled = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=12, temperature=1.0, seed=3)
    text = sampled.choices[0].text
    stop = next((text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip()), None)
    assert stop, text
    cut = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=12, temperature=1.0, seed=3, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    again = client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=12, temperature=1.0, seed=3)
    assert again.choices[0].text == text  # seeded sampling is reproducible
    unseeded = {client.completions.create(model=name, prompt=PROMPTS[4], max_tokens=12, temperature=1.0)
                .choices[0].text for _ in range(3)}
    assert len(unseeded) > 1  # without a seed each request samples afresh, as OpenAI's API does


def test_concurrent_requests_are_batched_and_equal_sequential(client, server):
    base, name = server
    sequential = [client.completions.create(model=name, prompt=p, max_tokens=8).choices[0].text for p in PROMPTS]
    before = _get(base + "/health")[1]
    results = [None] * len(PROMPTS)
    start = threading.Barrier(len(PROMPTS))

    def call(i):
        start.wait()
        results[i] = client.completions.create(model=name, prompt=PROMPTS[i], max_tokens=8).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == sequential
    after = _get(base + "/health")[1]
    assert after["requests"] - before["requests"] == len(PROMPTS)
    assert after["batches"] - before["batches"] < len(PROMPTS) and after["largest_batch"] > 1


def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(client, server, elrea_model):
    base, name = server
    k = len(elrea_model.adapters)
    cases = [
        (dict(model="no-such-model", prompt="hi"), openai.NotFoundError, "does not exist"),
        (dict(model=name, prompt="hi", extra_body={"elrea": {"weights": [1.0]}}), openai.BadRequestError,
         f"{k} non-negative numbers"),
        (dict(model=name, prompt="hi", extra_body={"elrea": {"weights": [0.5] * k}}), openai.BadRequestError,
         "summing to 1"),
        (dict(model=name, prompt="hi", extra_body={"elrea": {"router": "magic"}}), openai.BadRequestError,
         "unknown 'magic'"),
        (dict(model=name, prompt="hi", max_tokens=0), openai.BadRequestError, "max_tokens must be in"),
        (dict(model=name, prompt="hi", max_tokens=10 ** 6), openai.BadRequestError, "max_tokens must be in"),
        (dict(model=name, prompt="Add 1 and 2. " * 2000), openai.BadRequestError, "longer than"),
        (dict(model=name, prompt="hi", n=2), openai.BadRequestError, "n: only 1"),
        (dict(model=name, prompt="hi", temperature=5), openai.BadRequestError, "temperature"),
    ]
    for kwargs, err, message in cases:
        with pytest.raises(err, match=message):
            client.completions.create(**kwargs)
    with pytest.raises(openai.BadRequestError, match="last message must be the user"):
        client.chat.completions.create(model=name, messages=[{"role": "assistant", "content": "x"}])
    user = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    for kwargs, param in ((dict(tools=[tool]), "tools"), (dict(response_format={"type": "json_object"}),
                                                          "response_format"),
                          (dict(frequency_penalty=0.5), "frequency_penalty"), (dict(logit_bias={"42": 5}),
                                                                               "logit_bias")):
        with pytest.raises(openai.BadRequestError, match=f"{param}: not supported") as e:
            client.chat.completions.create(model=name, messages=user, max_tokens=2, **kwargs)
        assert e.value.body["param"] == param
    # the neutral values of those fields ask for nothing elrea lacks, and are served
    ok = client.chat.completions.create(model=name, messages=user, max_tokens=2, response_format={"type": "text"},
                                        tool_choice="none", frequency_penalty=0)
    assert ok.choices[0].message.content is not None
    status, body = _post_raw(base + "/v1/completions", b'{"model": "x", "prompt": ',
                             {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_json"
    wrong_key = openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    status, body = _get(base + "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert client.completions.create(model=name, prompt="Add 1 and 1.", max_tokens=3).choices[0].text is not None


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish(fitted_run, elrea_model):
    proc, base = _start(fitted_run)
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    body = json.dumps({"model": fitted_run.name, "prompt": PROMPTS[0], "max_tokens": 300, "stream": True})
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    events = []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        events.append(line[6:])
        if len(events) == 2:
            proc.send_signal(signal.SIGTERM)  # mid-stream
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    assert text == elrea_model.generate([PROMPTS[0]], raw=True, max_new_tokens=300)[0]  # the whole answer came
    assert proc.wait(timeout=60) == 0


def _stream_with_a_latecomer(client, name, k):
    """A long streamed answer (one expert, 120 tokens); after its 3rd chunk, a short request (4
    tokens) from another thread. Returns (chunks of the long answer seen when the short one
    finished, chunks in all, the short answer)."""
    one_hot = [0.0] * k
    one_hot[1] = 1.0
    long = client.completions.create(model=name, prompt=PROMPTS[5], max_tokens=120, stream=True,
                                     extra_body={"elrea": {"weights": one_hot}, "ignore_eos": True})
    seen, mark, short = 0, {}, {}

    def latecomer():
        short["r"] = client.completions.create(model=name, prompt=PROMPTS[6], max_tokens=4,
                                               extra_body={"elrea": {"weights": one_hot}})
        mark["at"] = seen

    thread = None
    for chunk in long:
        if chunk.choices and chunk.choices[0].text:
            seen += 1
        if seen == 3 and thread is None:
            thread = threading.Thread(target=latecomer)
            thread.start()
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    thread.join(timeout=60)
    return mark["at"], seen, finish, short["r"]


def test_a_request_that_arrives_mid_answer_joins_the_running_batch(client, server, elrea_model):
    """Continuous batching: the latecomer is prefilled between two steps of the long answer and
    finishes while it still streams, with the text it gets alone."""
    _, name = server
    k = len(elrea_model.adapters)
    at, total, finish, short = _stream_with_a_latecomer(client, name, k)
    assert finish == "length" and total > 20, "the long answer must stream long enough to overlap"
    assert at < total, f"the short request finished after the long one ({at} of {total} chunks)"
    w = torch.zeros(1, k)
    w[0, 1] = 1.0
    assert short.choices[0].text == elrea_model.generate([PROMPTS[6]], weights=w, raw=True, max_new_tokens=4)[0]


def test_static_batching_makes_the_latecomer_wait_and_a_full_queue_is_503(fitted_run, elrea_model):
    """The baseline policy (--batching static): the latecomer waits for the whole batch. With one
    slot and a queue of one, a third request is refused with 503 and the server keeps serving.
    A request routed to more adapters than the server has slots gets its top-1."""
    proc, base = _start(fitted_run, "--batching", "static", "--slots", "1", "--max-queue", "1", "--compile", "dynamo")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        name = fitted_run.name
        k = len(elrea_model.adapters)
        at, total, _, _ = _stream_with_a_latecomer(client, name, k)
        assert at == total
        h = _get(base + "/health", {"Authorization": f"Bearer {KEY}"})[1]
        assert h["batching"] == "static" and h["slots"] == 1 and h["slots_free"] == 1
        # compiled at start (dynamo-traced here), then once per (slots, columns) bucket in use: one
        # slot, and columns 64..1024 in powers of two
        assert h["compile"] == "dynamo" and 1 <= h["compiled_shapes"] <= 5 and h["eager_because"] is None
        one_hot = [0.0] * k
        one_hot[1] = 1.0
        body = {"elrea": {"weights": one_hot}}
        first = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=200, stream=True,
                                          extra_body={**body, "ignore_eos": True})
        next(iter(first))                                   # decoding: the slot is taken
        waiting = threading.Thread(target=lambda: client.completions.create(
            model=name, prompt=PROMPTS[1], max_tokens=2, extra_body=body))
        waiting.start()
        for _ in range(100):                                # the second request is in the queue
            if _get(base + "/health")[1]["queued"] == 1:
                break
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=2, extra_body=body)
        assert e.value.status_code == 503 and "--max-queue" in e.value.message
        first.close()
        waiting.join(timeout=60)
        assert _get(base + "/health")[1]["rejected"] == 1
        routed = client.completions.create(model=name, prompt=PROMPTS[3], max_tokens=2)
        w = routed.model_extra["elrea"]["weights"]
        assert sorted(w)[-1] == 1.0 and sum(x > 0 for x in w) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_client_input_never_gives_a_server_error(client, server):
    """Values a client may send that once gave a 500 (or NaN in JSON): now a 400, or an answer."""
    base, name = server
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    # a routing temperature far below any other: the one-hot of the best expert, finite weights
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=2, extra_body={"elrea": {"tau": 1e-300}})
    w = r.model_extra["elrea"]["weights"]
    assert all(x == x for x in w) and abs(sum(w) - 1) < 1e-4 and max(w) > 0.99
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=2, seed=2 ** 70)
    body = b'{"model": "%s", "prompt": "caf\\ud800", "max_tokens": 2}' % name.encode()
    status, err = _post_raw(base + "/v1/completions", body, auth)
    assert status == 400 and "not valid Unicode" in err["error"]["message"] and err["error"]["param"] == "prompt"
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % name.encode()
    status, err = _post_raw(base + "/v1/chat/completions", body, auth)
    assert status == 400 and err["error"]["param"] == "messages"
    # with --api-key, the API's description needs the key too; /health does not
    assert _get(base + "/openapi.json")[0] == 401 and _get(base + "/docs")[0] == 401
    assert _get(base + "/openapi.json", {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert _get(base + "/health")[0] == 200


def test_large_bodies_are_refused_before_they_are_read(server):
    base, name = server
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"model": "%s", "prompt": "%s"}' % (name.encode(), b"a" * (5 << 20))
    t = time.time()
    status, err = _post_raw(base + "/v1/completions", big, auth)
    assert status == 413 and err["error"]["code"] == "request_too_large" and time.time() - t < 5
    # no Content-Length (chunked): refused as the bytes pass the limit
    req = urllib.request.Request(base + "/v1/completions", data=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                                 headers={**auth, "Transfer-Encoding": "chunked"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413
    # under the body limit but far over the run's max_length: refused before it is tokenised
    long = b'{"model": "%s", "prompt": "%s"}' % (name.encode(), b"word " * (600 << 10))
    t = time.time()
    status, err = _post_raw(base + "/v1/completions", long, auth)
    assert status == 400 and err["error"]["code"] == "context_length_exceeded" and time.time() - t < 5
    t = time.time()
    assert _get(base + "/health")[0] == 200 and time.time() - t < 1
