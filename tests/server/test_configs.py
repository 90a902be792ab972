"""Typed configs: every field documented, validation that names the field (ValueError), mapped to
a 422 where user input becomes a config."""

from __future__ import annotations

import dataclasses

import pytest

from server.batcher import BatcherConfig
from server.configs import field_docs
from server.creation import TaskCreate, TrainOptions
from server.engine import EngineConfig
from server.errors import InvalidRequest
from server.methods import REGISTRY, BackboneDims
from server.training.trainer import TrainConfig

CONFIGS = [entry.module.config_class for entry in REGISTRY.values()] + [TrainConfig, EngineConfig, BatcherConfig, BackboneDims]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls) -> None:
    undocumented = [name for name, doc in field_docs(cls).items() if not doc]
    assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [(REGISTRY["prompt_tuning"].module.config_class, "n_virtual", 0), (REGISTRY["attempt"].module.config_class, "bottleneck", 0),
     (REGISTRY["pha"].module.config_class, "temperature", 0.0), (REGISTRY["ip"].module.config_class, "task_dim", -1),
     (REGISTRY["tpv"].module.config_class, "default_origin", ""), (TrainConfig, "steps", 0), (TrainConfig, "warmup_ratio", 1.5),
     (EngineConfig, "max_input_tokens", 0), (BatcherConfig, "max_queue", 0)],
)
def test_validation_names_the_field(cls, field: str, value) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        cls(**{field: value})


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().steps = 3  # type: ignore[misc]


def test_a_train_config_refused_from_a_request_is_a_422_naming_the_field() -> None:
    body = TaskCreate.model_construct(name="t", method="prompt_tuning", train=TrainOptions.model_construct(steps=0, batch_size=8, lr=None, prompt_lr=None, seed=0))
    with pytest.raises(InvalidRequest, match="train.steps") as info:
        body.train_config()
    assert info.value.status == 422


def test_cli_training_resolves_train_autocast_as_a_server_worker_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from server.cli import build_parser
    from server.cli.common import settings_from
    from server.cli.experiments import _train_config

    monkeypatch.delenv("TASKSERVE_TRAIN_AUTOCAST", raising=False)
    # read here independently of the code under test: auto is bf16 on a CPU with native bf16
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags

    def config(*flags: str) -> TrainConfig:
        args = build_parser().parse_args(["train", "--method", "ip", "--device", "cpu", *flags])
        return _train_config(args, settings_from(args))

    assert config().autocast == ("bfloat16" if native_bf16 else "off")
    assert config("--train-autocast", "off").autocast == "off"
    assert config("--train-autocast", "bfloat16").autocast == "bfloat16"
    monkeypatch.setenv("TASKSERVE_TRAIN_AUTOCAST", "off")  # the server's setting applies when the flag is not given
    assert config().autocast == "off"
