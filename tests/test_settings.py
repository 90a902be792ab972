"""Tests for server/settings.py: defaults, TASKSERVE_* environment, validation, device/dtype resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from server.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TASKSERVE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = Settings()
    assert (s.backbone, s.form_module, s.device, s.dtype) == ("smollm2", "minilm", "auto", "auto")
    assert s.cache_dir == Path.home() / ".cache" / "taskserve"
    assert (s.store, s.host, s.port) == (Path("store"), "127.0.0.1", 8000)


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 20, name


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKSERVE_BACKBONE", "/models/t5-small")
    monkeypatch.setenv("TASKSERVE_DEVICE", "CPU")
    monkeypatch.setenv("TASKSERVE_DTYPE", "BFloat16")
    monkeypatch.setenv("TASKSERVE_CACHE_DIR", "~/elsewhere")
    monkeypatch.setenv("TASKSERVE_PORT", "9001")
    s = Settings()
    assert s.backbone == "/models/t5-small"
    assert (s.device, s.dtype, s.port) == ("cpu", "bfloat16", 9001)
    assert s.cache_dir == Path.home() / "elsewhere"


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", "int8"), ("dtype", "fp32"), ("device", "gpu"), ("device", "cuda:x"), ("port", 70000)],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_resolved_device_and_dtype() -> None:
    cuda = torch.cuda.is_available()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags  # read here independently of the code under test
    auto = Settings()
    assert auto.resolved_device() == torch.device("cuda" if cuda else "cpu")
    assert auto.resolved_dtype() == (torch.bfloat16 if cuda or native_bf16 else torch.float32)
    cpu = Settings(device="cpu")
    assert cpu.resolved_device() == torch.device("cpu")
    assert cpu.resolved_dtype() == (torch.bfloat16 if native_bf16 else torch.float32)
    assert cpu.resolved_dtype(training=True) == torch.float32  # training on a CPU stays fp32
    assert Settings(device="cuda:1").resolved_dtype() == torch.bfloat16  # resolving needs no GPU
    assert Settings(device="cpu", dtype="float16").resolved_dtype() == torch.float16
    # a job's training steps: bf16 autocast where bf16 is native, fp32 elsewhere, unless forced
    assert cpu.resolved_train_autocast() == ("bfloat16" if native_bf16 else "off")
    assert Settings(device="cuda").resolved_train_autocast() == "bfloat16"
    assert Settings(device="cpu", train_autocast="off").resolved_train_autocast() == "off"
    assert Settings(device="cpu", train_autocast="bfloat16").resolved_train_autocast() == "bfloat16"
    # the trainer's own `auto` (a script calling it directly) means the same
    from server.training.trainer import TrainConfig

    assert TrainConfig().mixed_precision(torch.device("cpu")) == native_bf16
    assert TrainConfig().mixed_precision(torch.device("cuda", 0))
    assert not TrainConfig(autocast="off").mixed_precision(torch.device("cuda", 0))
    assert TrainConfig(autocast="bfloat16").mixed_precision(torch.device("cpu"))


def test_import_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, server.settings; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_settings_survive_the_environment_round_trip(monkeypatch) -> None:
    """The embedded worker gets the server's settings as TASKSERVE_* variables: every field, unset
    optional ones included (read back as "unset", not as a value to parse), reads back the same."""
    from server.api.supervisor import settings_env

    for original in (Settings(), Settings(threads=3, api_key="k", db_url="sqlite:///x.db", plugins="a.b")):
        for name, value in settings_env(original).items():
            monkeypatch.setenv(name, value)
        assert Settings().model_dump() == original.model_dump()
