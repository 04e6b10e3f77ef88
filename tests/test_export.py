"""Export, verify and serve on one enrolled example user (real model, embedder, bank and llama.cpp)."""

import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import gguf
import pytest
from click.testing import CliRunner

from mta_local.cli import cli

from .conftest import EXAMPLES

pytestmark = pytest.mark.slow

MOVIE_USER = "lamp2-user-8000029.json"
QUERY = json.loads((EXAMPLES / "queries.json").read_text())[MOVIE_USER]["prompt"]


@pytest.fixture(scope="module")
def home(enrolled_home):
    return enrolled_home[0]


@pytest.fixture(scope="module")
def enrolled(enrolled_home, home):
    """The session's enrolled example ("default"), plus a second profile "other" with a different adapter.

    "other" copies the first profile and replaces its GGUF with the negated combined adapter (and a
    probe recorded for it). Serving isolation concerns adapter and cache state inside llama.cpp, not
    how an adapter was trained, so two distinct adapters on the same base test it fully, without a
    second training run.
    """
    result = enrolled_home[1]
    previous = os.environ.get("MTA_LOCAL_HOME")
    os.environ["MTA_LOCAL_HOME"] = str(home)
    try:
        make_other_profile(home)
    finally:
        os.environ.pop("MTA_LOCAL_HOME") if previous is None else os.environ.update(MTA_LOCAL_HOME=previous)
    return result


def make_other_profile(home):
    from mta_local.chat import adapter_probe
    from mta_local.gguf_adapter import write_adapter
    from mta_local.history import parse_history
    from mta_local.merge import LoraWeights
    from mta_local.models import resolve_base_model
    from mta_local.profile import load_profile
    from mta_local.verify import combined_adapter

    folder = home / "data" / "profiles"
    shutil.copytree(folder / "default", folder / "other")
    profile = load_profile("other")
    combined = combined_adapter(profile).folded()
    negated = LoraWeights({m: (a, -b) for m, (a, b) in combined.tensors.items()}, 1.0)
    base = resolve_base_model()
    write_adapter(profile.adapter_gguf, negated, base)
    recipe = dict(profile.recipe, profile="other")
    recipe["probe"] = adapter_probe(base, profile.adapter_gguf, parse_history(profile.history()))
    (profile.path / "recipe.json").write_text(json.dumps(recipe, indent=1))


@pytest.fixture
def in_home(home, monkeypatch):
    monkeypatch.setenv("MTA_LOCAL_HOME", str(home))
    return home


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ---------------------------------------------------------------------------------------------
# export

def test_export_gguf_separate(enrolled, in_home, tmp_path):
    from mta_local.gguf_adapter import KEY_RECIPE, check_adapter_file
    from mta_local.models import resolve_base_model

    result = invoke("export", "--to", "gguf", "--separate", "--out", str(tmp_path / "gguf"))

    assert result.exit_code == 0, result.output
    recipe = json.loads((in_home / "data" / "profiles" / "default" / "recipe.json").read_text())
    ranks = {"adapter.gguf": [20], "merged.gguf": [16], "stacked.gguf": [4]}
    for name, rank in ranks.items():
        path = tmp_path / "gguf" / name
        assert str(path) in result.output
        assert check_adapter_file(path, resolve_base_model())["ranks"] == rank
        metadata = json.loads(gguf.GGUFReader(str(path)).get_field(KEY_RECIPE).contents())
        assert metadata["profile"] == "default"
        assert metadata["bank"]["id"] == "lamp2-movies"
        assert metadata["anchors"] == recipe["anchors"]
    assert not list((tmp_path / "gguf").glob(".*"))


def test_export_ollama_modelfile(enrolled, in_home, tmp_path):
    from mta_local.models import resolve_base_model

    out = tmp_path / "with space" / "ollama"

    result = invoke("export", "--to", "ollama", "--out", str(out))

    assert result.exit_code == 0, result.output
    lines = (out / "Modelfile").read_text().splitlines()
    assert lines[0] == f"FROM {json.dumps(str(resolve_base_model().path))}"
    assert [line for line in lines if line.startswith("ADAPTER ")] == [f"ADAPTER {json.dumps(str(out / 'adapter.gguf'))}"]
    assert any(line.startswith('TEMPLATE """') for line in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert f"ollama create mta-default -f '{out / 'Modelfile'}'" in result.output


def test_export_peft_reproduces_profile(enrolled, in_home, tmp_path):
    import torch
    from peft import PeftModel

    from mta_local.merge import fold_into
    from mta_local.models import load_training_model, resolve_base_model
    from mta_local.profile import load_profile
    from mta_local.verify import combined_adapter

    base = resolve_base_model()
    result = invoke("export", "--to", "peft", "--out", str(tmp_path / "peft"))
    peft_model = PeftModel.from_pretrained(load_training_model(base, device="cpu")[0], str(tmp_path / "peft")).eval()
    folded, tokenizer = load_training_model(base, device="cpu")
    fold_into(folded, combined_adapter(load_profile()))
    ids = torch.tensor([tokenizer(QUERY)["input_ids"][-96:]])

    with torch.no_grad():
        expected, actual = folded(ids).logits, peft_model(ids).logits

    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 20
    assert torch.allclose(actual, expected, atol=2e-3, rtol=0)


def test_export_out_under_file(enrolled, in_home, tmp_path):
    (tmp_path / "afile").write_text("")

    result = invoke("export", "--to", "peft", "--out", str(tmp_path / "afile" / "sub"))

    assert result.exit_code == 1
    assert "cannot create the export folder" in result.output
    assert "Pass --out with a folder path you can write to." in result.output


def test_export_separate_needs_gguf(enrolled, in_home):
    result = invoke("export", "--to", "peft", "--separate")

    assert result.exit_code == 2
    assert "--separate applies to --to gguf only" in result.output


# ---------------------------------------------------------------------------------------------
# verify

def test_verify_passes(enrolled, in_home):
    result = invoke("verify", "--prompts", "2")

    assert result.exit_code == 0, result.output
    assert result.output.count("ok\t") == 3
    for name in ("runtime parity", "combined vs split", "greedy agreement"):
        assert f"ok\t{name}:" in result.output


def test_verify_failure_exits_with_one_line(enrolled, in_home, monkeypatch):
    import mta_local.verify
    from mta_local.verify import Check

    monkeypatch.setattr(mta_local.verify, "verify_profile", lambda profile, config: [
        Check("runtime parity", False, "correlation 0.9 (threshold 0.9999)")])

    result = invoke("verify")

    assert result.exit_code == 1
    assert "FAILED\truntime parity" in result.output
    assert "Error: profile 'default' failed runtime parity; enroll again" in result.output


# ---------------------------------------------------------------------------------------------
# serve

@pytest.fixture(scope="module")
def server(enrolled, home):
    """Serve both profiles on a free loopback port in a thread; yield (ProfileServer, base URL)."""
    from mta_local.serve import ProfileServer, make_http_server

    previous = os.environ.get("MTA_LOCAL_HOME")
    os.environ["MTA_LOCAL_HOME"] = str(home)
    try:
        profiles = ProfileServer(["default", "other"], n_ctx=1024)
        httpd = make_http_server(profiles, "127.0.0.1", 0)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield profiles, f"http://127.0.0.1:{httpd.server_address[1]}"
        httpd.shutdown()
        httpd.server_close()
    finally:
        os.environ.pop("MTA_LOCAL_HOME") if previous is None else os.environ.update(MTA_LOCAL_HOME=previous)


def post(url, payload):
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, response.read().decode()


def ask(url, model, max_tokens=8, content=QUERY):
    status, body = post(url, {"model": model, "messages": [{"role": "user", "content": content}],
                              "max_tokens": max_tokens, "temperature": 0})
    assert status == 200
    return json.loads(body)["choices"][0]["message"]["content"]


def test_serve_lists_models(server):
    with urllib.request.urlopen(server[1] + "/v1/models", timeout=30) as response:
        ids = [model["id"] for model in json.loads(response.read())["data"]]

    assert ids == ["base", "default", "other"]


def test_serve_no_leak_between_profiles(server, in_home):
    from mta_local.serve import ProfileServer

    first, other, again, base = ask(server[1], "default"), ask(server[1], "other"), ask(server[1], "default"), ask(server[1], "base")
    cold = "".join(ProfileServer(["other"], n_ctx=1024).complete("other", [{"role": "user", "content": QUERY}], 8))

    assert first == again
    assert other == cold
    assert first != other
    assert base not in (first, other)


def test_serve_stream_equals_plain(server):
    status, body = post(server[1], {"model": "default", "messages": [{"role": "user", "content": QUERY}],
                                    "max_tokens": 8, "temperature": 0, "stream": True})
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line.startswith("data: ")]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])

    assert status == 200
    assert events[-1] == "[DONE]"
    assert text == ask(server[1], "default")


def test_serve_reports_token_usage(server):
    status, body = post(server[1], {"model": "default", "messages": [{"role": "user", "content": QUERY}],
                                    "max_tokens": 8, "temperature": 0})
    usage = json.loads(body)["usage"]

    assert status == 200
    assert usage["prompt_tokens"] > 50
    assert 1 <= usage["completion_tokens"] <= 9
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_serve_unknown_model(server):
    with pytest.raises(urllib.error.HTTPError) as caught:
        post(server[1], {"model": "nobody", "messages": [{"role": "user", "content": "hi"}]})

    assert caught.value.code == 404
    assert "model 'nobody' not found; available: base, default, other" in caught.value.read().decode()


def test_serve_names_unserved_profile(enrolled, in_home):
    from mta_local.serve import ProfileServer, RequestError

    server = ProfileServer(["default"])

    with pytest.raises(RequestError) as caught:
        server.complete("other", [{"role": "user", "content": "hi"}])
    assert caught.value.status == 404
    assert "profile 'other' is enrolled but not served by this server" in str(caught.value)


def test_serve_port_in_use(enrolled, in_home):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--port", str(port), "--profiles", "default"])

    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "pass another --port" in result.output


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_serve_switching_keeps_memory_flat(server):
    for model in ("default", "other", "base"):
        ask(server[1], model, max_tokens=1, content="A heist film.")
    before = rss_bytes()

    for index in range(50):
        ask(server[1], ("default", "other")[index % 2], max_tokens=1, content="A heist film.")

    assert rss_bytes() - before < 50 * 1024 * 1024


def test_serve_prompt_equals_training_prompt(server, in_home):
    from mta_local.history import Retriever, parse_history
    from mta_local.profile import load_profile
    from mta_local.tasks import build_prompt
    from mta_local.templates import prompt_renderer

    profiles = server[0]
    history = parse_history(load_profile("default").history())
    description = "A young boy learns he is a wizard and attends a school of magic."
    trained = prompt_renderer(profiles.base)(build_prompt(history.task, description, Retriever(history).lines(description, 1)))

    served = profiles.prompt_text("default", [{"role": "user", "content": history.task.instruction(description)}])

    assert served == trained
