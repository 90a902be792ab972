"""HF PEFT prompt-tuning checkpoints in and out through `taskserve tasks import-peft / export-peft`
and a real server, with the real `peft` package: an imported checkpoint answers as PEFT's own model
does, an exported task loads with `PeftModel.from_pretrained` and gives the served scores."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

from adapters_store.store import Store
from helpers import tiny_llama, tiny_t5
from peft_reference import peft_label_probs
from server import peft_format
from server.backbone import load_backbone
from server.cli import main
from server.data.spec import TaskSpec
from server.engine import Engine
from server.settings import Settings
from server.store_sync import attach
from serving import running_server

KEY = "k"
N_VIRTUAL = 7
SPEC = TaskSpec(template="{text} =>", labels=("yes", "no"), scoring="sum")
TEXTS = ["is the sky blue", "two plus two", "hello there"]


@pytest.fixture(scope="module", params=["llama", "t5"])
def served(request, tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    root = tmp_path_factory.mktemp(f"peft-{request.param}")
    backbone = tiny_t5() if request.param == "t5" else tiny_llama()
    backbone.model.save_pretrained(root / "model")
    backbone.tokenizer.save_pretrained(root / "model")
    settings = Settings(backbone=str(root / "model"), store=root / "store", device="cpu", dtype="float32", seed_store=None, api_key=KEY, embedded_worker=False, form_module="none")
    with running_server(settings) as url:
        yield request.param, url, root


def fresh_peft(root: Path, seed: int):
    """A PEFT prompt-tuned model over a fresh copy of the served backbone, its prompt seeded-random."""
    backbone = load_backbone(str(root / "model"))
    task_type = TaskType.SEQ_2_SEQ_LM if backbone.is_encoder_decoder else TaskType.CAUSAL_LM
    model = get_peft_model(backbone.model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=N_VIRTUAL))
    with torch.no_grad():
        table = model.prompt_encoder["default"].embedding.weight
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed)))
    return backbone, model.eval()


def served_probs(url: str, task: str) -> torch.Tensor:
    got = httpx.post(f"{url}/v1/predict", json={"inputs": [{"task": task, "text": t} for t in TEXTS]}).json()["results"]
    return torch.tensor([[r["scores"][label] for label in SPEC.labels] for r in got])


def test_an_imported_checkpoint_answers_as_peft_does(served, tmp_path: Path, monkeypatch, capsys) -> None:
    kind, url, root = served
    backbone, model = fresh_peft(root, seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    monkeypatch.setenv("TASKSERVE_API_KEY", KEY)
    assert main(["tasks", "import-peft", str(tmp_path / "ckpt"), "--name", f"imported-{kind}", "--labels", "yes,no", "--template", SPEC.template, "--scoring", "sum", "--url", url]) == 0
    assert f"as imported-{kind} v1" in capsys.readouterr().out
    want = torch.stack([peft_label_probs(model, backbone, SPEC, t, N_VIRTUAL) for t in TEXTS])
    assert torch.allclose(served_probs(url, f"imported-{kind}"), want, atol=1e-5)


def test_an_exported_task_loads_in_peft_with_the_same_scores(served, tmp_path: Path, monkeypatch) -> None:
    """Prompt tuning exports its prompt; TPV its θ_init + τ (a TPV task published by another process)."""
    kind, url, root = served
    monkeypatch.setenv("TASKSERVE_API_KEY", KEY)
    d = load_backbone(str(root / "model")).d_model
    created = httpx.post(f"{url}/v1/tasks", headers={"X-API-Key": KEY}, json={"name": "pt-export", "method": "prompt_tuning", "labels": ["yes", "no"],
                         "template": SPEC.template, "scoring": "sum", "init": {"prompt": torch.randn(N_VIRTUAL, d).tolist()}})
    assert created.status_code == 201, created.text
    other = Engine(load_backbone(str(root / "model")))
    writer = Store(root / "store")
    attach(writer, other)
    tpv = other.tasks.new("tpv-export", "tpv", SPEC)
    with torch.no_grad():
        tpv.params["tau"].normal_()
    writer.publish(tpv, other.backbone.fingerprint)
    writer.close()
    deadline = time.monotonic() + 10
    while httpx.post(f"{url}/v1/predict", json={"task": "tpv-export", "text": "x"}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for name in ("pt-export", "tpv-export"):
        assert main(["tasks", "export-peft", name, str(tmp_path / name), "--url", url]) == 0
        backbone = load_backbone(str(root / "model"))
        n_virtual = json.loads((tmp_path / name / "adapter_config.json").read_text())["num_virtual_tokens"]
        model = PeftModel.from_pretrained(backbone.model, str(tmp_path / name)).eval()
        want = torch.stack([peft_label_probs(model, backbone, SPEC, t, n_virtual) for t in TEXTS])
        assert torch.allclose(served_probs(url, name), want, atol=1e-5), name


def test_what_cannot_be_imported_or_exported_is_refused_clearly(served, tmp_path: Path, monkeypatch, capsys) -> None:
    kind, url, root = served
    monkeypatch.setenv("TASKSERVE_API_KEY", KEY)
    _, model = fresh_peft(root, seed=2)
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled" / "adapter_model.safetensors").exists()
    assert main(["tasks", "import-peft", str(tmp_path / "pickled"), "--name", "pickled", "--url", url]) == 1
    assert "pickle" in capsys.readouterr().err
    d = load_backbone(str(root / "model")).d_model
    peft_format.write(tmp_path / "foreign", torch.randn(N_VIRTUAL, d + 5), seq2seq=kind == "t5", base_model="another-model")  # another hidden size
    assert main(["tasks", "import-peft", str(tmp_path / "foreign"), "--name", "foreign", "--url", url]) == 1
    assert f"expected shape [m, {d}]" in capsys.readouterr().err
    assert httpx.post(f"{url}/v1/tasks", headers={"X-API-Key": KEY}, json={"name": "zero-shot", "method": "plain", "labels": ["yes", "no"], "scoring": "sum"}).status_code == 201
    refused = httpx.get(f"{url}/v1/tasks/zero-shot/prompt", headers={"X-API-Key": KEY})
    assert refused.status_code == 422 and "fixed soft prompt" in refused.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/tasks/zero-shot/prompt").status_code == 401  # a task's weights are an admin read


def test_attempt_says_why_it_has_no_fixed_prompt() -> None:
    from helpers import CLASSIFY, make_engine
    from server.errors import Incompatible

    engine = make_engine("llama")
    task = engine.tasks.new("a", "attempt", CLASSIFY)
    with pytest.raises(Incompatible, match="per instance"):
        engine.tasks.method("attempt").fixed_prompt(task)
