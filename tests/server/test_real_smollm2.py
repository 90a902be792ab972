"""The engine on the REAL embedded default: SmolLM2-135M-Instruct + all-MiniLM-L6-v2 (marker `real`).

Shared methods carry random (seeded, perturbed) weights here (the demo store holds trained ones),
but the backbone, the tokenizer, the form module and the full 100-token prompts are real."""

from __future__ import annotations

import pytest
import torch

from helpers import perturb
from server import assets
from server.backbone import load_backbone, load_form_module
from server.data.spec import TaskSpec
from server.engine import Engine, Request
from server.settings import Settings

pytestmark = pytest.mark.real

SENTIMENT = TaskSpec(
    template="Review: {text}\nSentiment:",
    labels=(" negative", " positive"),
    description="Tell me the sentiment of the film review:",
    scoring="first",
)
REVIEWS = [  # labels as written (the leading space they are scored with is the backbone's business)
    ("A wonderful, moving film with superb acting.", "positive"),
    ("Dull, tedious and far too long. I hated it.", "negative"),
    ("One of the best films of the year, a joy to watch.", "positive"),
    ("A boring mess with a terrible script.", "negative"),
]


@pytest.fixture(scope="module")
def real_engine() -> Engine:
    cache = Settings().cache_dir
    backbone = load_backbone(assets.resolve_backbone("smollm2", cache))
    form = load_form_module(str(assets.minilm_dir()))
    return Engine(backbone, form)


def test_real_backbone_shapes(real_engine: Engine) -> None:
    b = real_engine.backbone
    assert (b.kind, b.d_model, b.n_layers, len(b.encoder_ffns), len(b.decoder_ffns)) == ("decoder", 576, 30, 15, 15)
    assert real_engine.dims.form_layers == 6 and real_engine.dims.form_dim == 384
    assert all(not p.requires_grad for p in b.model.parameters())


def test_zero_shot_sentiment_with_the_served_template(real_engine: Engine) -> None:
    """The plain backbone (a plain task; an empty soft prompt is the same) gets obvious reviews right
    with first-token scoring — the template is part of the task (DESIGN.md)."""
    real_engine.tasks.add(real_engine.tasks.new("zero-shot", "prompt_tuning", SENTIMENT, init={"prompt": torch.zeros(0, 576)}))
    real_engine.tasks.add(real_engine.tasks.new("plain", "plain", SENTIMENT))
    assert [r.scores for r in real_engine.run([Request("plain", text) for text, _ in REVIEWS])] == [r.scores for r in real_engine.run([Request("zero-shot", text) for text, _ in REVIEWS])]
    results = real_engine.run([Request("zero-shot", text) for text, _ in REVIEWS])
    assert [r.label for r in results] == [label for _, label in REVIEWS]


def test_batch_invariance_all_five_methods_on_smollm2(real_engine: Engine) -> None:
    perturb(real_engine, scale=0.05)
    names = []
    for method in ("prompt_tuning", "tpv", "attempt", "ip", "pha"):
        for i in range(2):
            task = real_engine.tasks.new(f"real-{method}-{i}", method, SENTIMENT, seed=i)
            with torch.no_grad():
                for p in task.params.values():
                    p.add_(torch.randn_like(p) * 0.01)
            real_engine.tasks.add(task)
            names.append(task.name)
    requests = [Request(name, REVIEWS[i % len(REVIEWS)][0]) for i, name in enumerate(names)]
    batch = real_engine.run(requests)
    for request, got in zip(requests, batch):
        solo = real_engine.run([request])[0]
        assert got.label == solo.label
        for label, p in solo.scores.items():
            assert got.scores[label] == pytest.approx(p, abs=1e-5)


def test_a_peft_checkpoint_on_smollm2_imports_and_exports_exactly(tmp_path) -> None:
    """A PEFT PROMPT_TUNING checkpoint made on the real SmolLM2 answers here as PEFT's own model does,
    and the task exported back loads in PEFT with the same scores (fp32, 1e-5)."""
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

    from peft_reference import peft_label_probs
    from server import peft_format
    from server.methods import method_for_peft

    folder = assets.resolve_backbone("smollm2", Settings().cache_dir)
    n_virtual = 20
    peft_backbone = load_backbone(folder)
    model = get_peft_model(peft_backbone.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual))
    with torch.no_grad():
        table = model.prompt_encoder["default"].embedding.weight
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    model.eval().save_pretrained(tmp_path / "ckpt")
    engine = Engine(load_backbone(folder))  # its own copy: the engine's hooks must not sit on PEFT's model
    method = method_for_peft("PROMPT_TUNING")
    task = engine.tasks.new("imported", method, SENTIMENT, init={"prompt": peft_format.read(tmp_path / "ckpt").prompt})
    engine.tasks.add(task)
    served = torch.tensor([[r.scores[label] for label in SENTIMENT.labels] for r in engine.run([Request("imported", t) for t, _ in REVIEWS])])
    want = torch.stack([peft_label_probs(model, peft_backbone, SENTIMENT, t, n_virtual) for t, _ in REVIEWS])
    assert torch.allclose(served, want, atol=1e-5)
    peft_format.write(tmp_path / "out", engine.tasks.method(method).fixed_prompt(task), seq2seq=False, base_model="smollm2")
    reloaded = PeftModel.from_pretrained(load_backbone(folder).model, str(tmp_path / "out")).eval()
    again = torch.stack([peft_label_probs(reloaded, peft_backbone, SENTIMENT, t, n_virtual) for t, _ in REVIEWS])
    assert torch.allclose(served, again, atol=1e-5)
