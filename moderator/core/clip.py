"""The open_clip model: loading, device and precision, image and text encoding.

Everything here runs on the thread that owns the device (the model worker), except loading.

Only the image tower runs at the chosen precision. The text tower always runs in fp32: a
prompt is encoded once and cached, so its speed hardly matters, and in fp32 its embedding does
not depend on the precision or on which prompts shared its batch (in bf16 it moved by up to
1.4e-3 with the batch, enough to move a score near a threshold). So two servers, a restarted
server and the offline tools all score an image embedding against the same policy text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import convert_weights_to_lp
from open_clip.timm_model import TimmModel
from open_clip.transformer import LayerNorm, LayerNormFp32

from moderator.config import ModelConfig
from moderator.core.cpus import usable_cpus
from moderator.core.views import Preprocessing
from moderator.core.weights import verify_weights
from moderator.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

TEXT_BATCH_SIZE = 256
_TRIMMABLE_TEXT_ATTRS = (
    "token_embedding",
    "positional_embedding",
    "transformer",
    "ln_final",
    "text_projection",
    "attn_mask",
)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(
            f"--device {requested!r} is not a device (use auto, cpu or cuda[:N])"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested} asked for CUDA but no CUDA device is available")
    return device


# open_clip's "fp16"/"bf16" cast the weights of linear, conv and attention layers (as OpenAI's
# CLIP does) and compute layer norms in fp32 (timm towers are cast whole); inputs are cast to
# the same dtype. Autocast was slower on CPU. cast_image_tower does that to the image tower only.
TEXT_PRECISION = "fp32"
_OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionProbes:
    """What the hardware supports; injectable so the choice can be tested anywhere."""

    cpu_bf16: Callable[[], bool]
    cuda_bf16: Callable[[], bool]


def _cpu_has_fast_bf16() -> bool:
    # oneDNN runs bf16 natively with AVX-512 BF16 or AMX; elsewhere it emulates it, slower than
    # fp32 (torch.ops.mkldnn._is_mkldnn_bf16_supported() is true there too, so it is not used).
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _cuda_has_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


DEFAULT_PROBES = PrecisionProbes(cpu_bf16=_cpu_has_fast_bf16, cuda_bf16=_cuda_has_bf16)


def resolve_precision(
    requested: str, device: torch.device, probes: PrecisionProbes = DEFAULT_PROBES
) -> torch.dtype:
    """auto: bf16 on CPUs with native bf16, else fp32; bf16 on GPUs that have it, else fp16."""
    if requested != "auto":
        if requested not in PRECISIONS:
            raise ConfigError(f"--precision {requested!r}: use auto, fp32, bf16 or fp16")
        return PRECISIONS[requested]
    if device.type == "cuda":
        return torch.bfloat16 if probes.cuda_bf16() else torch.float16
    return torch.bfloat16 if probes.cpu_bf16() else torch.float32


def weights_key(config: ModelConfig) -> str | None:
    """Identifies the weights for the text-embedding cache; None for random weights."""
    if config.pretrained is None and not config.name.startswith(("hf-hub:", "local-dir:")):
        return None
    if config.pretrained is not None and Path(config.pretrained).is_file():
        stat = Path(config.pretrained).stat()
        return (
            f"{config.name}|{Path(config.pretrained).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        )
    return f"{config.name}|{config.pretrained}"


def describe_pretrained(config: ModelConfig) -> str:
    if config.name.startswith(("hf-hub:", "local-dir:")):
        return "bundled"
    if config.pretrained is None:
        return "random"
    return Path(config.pretrained).name if Path(config.pretrained).is_file() else config.pretrained


@dataclass(frozen=True)
class ModelInfo:
    model_id: str  # "<name>/<pretrained>", carried in every response
    name: str
    pretrained: str
    device: str
    precision: str  # fp32 | bf16 | fp16
    weights_key: str | None  # None: random weights, nothing worth caching


@dataclass(frozen=True)
class StagedPixels:
    """A batch on the model device, or being copied there: `ready` is the copy's CUDA event."""

    pixels: torch.Tensor
    ready: Any = None  # torch.cuda.Event; None on the CPU


@dataclass(frozen=True)
class OnHost:
    """Tensors being copied back from the device: `wait()` before reading them."""

    tensors: tuple[torch.Tensor, ...]
    ready: Any = None  # torch.cuda.Event recorded after the copies; None on the CPU

    def wait(self) -> tuple[torch.Tensor, ...]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensors


def gather_views(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images' views as one batch tensor (one image's own tensor needs no copy)."""
    return views[0] if len(views) == 1 else torch.cat(list(views))


def assemble_on_device(
    views: Sequence[torch.Tensor], device: torch.device, stream: Any = None
) -> torch.Tensor:
    """One batch on `device`, in the views' order, made on `stream` (the current one; None off
    CUDA): the host views in one copy from pinned memory, the views already on the device
    (decoded there) copied in place."""
    host = [v for v in views if v.device.type == "cpu"]
    count = sum(int(v.shape[0]) for v in host)
    from_host = None
    if host:
        pin = device.type == "cuda"
        pinned = torch.empty((count, *host[0].shape[1:]), dtype=torch.uint8, pin_memory=pin)
        torch.cat(host, out=pinned)
        from_host = pinned.to(device, non_blocking=True)
    if len(host) == len(views) and from_host is not None:
        return from_host
    total = sum(int(v.shape[0]) for v in views)
    batch = torch.empty((total, *views[0].shape[1:]), dtype=torch.uint8, device=device)
    at = at_host = 0
    for view in views:
        size = int(view.shape[0])
        if view.device.type == "cpu":
            assert from_host is not None
            batch[at : at + size].copy_(from_host[at_host : at_host + size])
            at_host += size
        else:
            if stream is not None:  # made on the decoder's stream: not reused while read here
                view.record_stream(stream)
            batch[at : at + size].copy_(view)
        at += size
    return batch


def copy_to_host(*tensors: torch.Tensor) -> OnHost:
    """Start copying `tensors` to the host without waiting for the device (a non-blocking copy
    from CUDA lands in page-locked memory); OnHost.wait() says when they are there."""
    if all(t.device.type == "cpu" for t in tensors):
        return OnHost(tensors)
    # The copies run on the tensors' device's current stream: the event must be recorded on
    # that one, not on the current device's (cuda:0 in a thread that never set one).
    with torch.cuda.device(tensors[0].device):
        copies = tuple(t.to("cpu", non_blocking=True) for t in tensors)
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record()
    return OnHost(copies, ready)


class ClipModel:
    """An open_clip model placed on its device, with the preprocessing it expects."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        info: ModelInfo,
    ) -> None:
        self.model = model  # open_clip is untyped
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.info = info
        cfg: dict[str, Any] = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        mean = tuple(cfg.get("mean") or OPENAI_DATASET_MEAN)
        std = tuple(cfg.get("std") or OPENAI_DATASET_STD)
        size = self.model.visual.image_size
        self.preprocessing = Preprocessing(
            size=int(size if isinstance(size, int) else size[0]),
            fill=(round(255 * mean[0]), round(255 * mean[1]), round(255 * mean[2])),
        )
        # (x / 255 - mean) / std folded into one multiply-add, applied on the device.
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(device, dtype)
        self._shift = (-mean_t / std_t).to(device, dtype)
        self._copy_stream: Any = None  # torch.cuda.Stream, made on first use
        self.embed_dim = int(self.encode_texts(["a"]).shape[1])

    @torch.inference_mode()
    def stage_images(self, views: Sequence[torch.Tensor]) -> torch.Tensor | StagedPixels:
        """Images' uint8 views [V, 3, S, S] (on the host, or already on the device when decoded
        there) -> one batch ready for `encode_images`.

        On CUDA the host views are gathered straight into page-locked memory (PyTorch's caching
        host allocator keeps a block until the copies reading it are done) and copied on a
        stream of its own, so the copy of one batch overlaps the forward pass of another.
        """
        if self.device.type != "cuda":
            return gather_views(views)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        with torch.cuda.stream(self._copy_stream):
            on_device = assemble_on_device(views, self.device, self._copy_stream)
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
        return StagedPixels(on_device, ready)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor | StagedPixels) -> torch.Tensor:
        """uint8 [B, 3, S, S] (on the host, or staged) -> L2-normalised float32 [B, E] on the
        device."""
        staged = pixels if isinstance(pixels, StagedPixels) else self.stage_images([pixels])
        batch = staged.pixels if isinstance(staged, StagedPixels) else staged
        if isinstance(staged, StagedPixels) and staged.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(staged.ready)  # the copy, made on another stream, is done
            batch.record_stream(stream)
        batch = batch.to(self.device).to(self.dtype)
        features = self.model.encode_image(batch.mul_(self._scale).add_(self._shift))
        return F.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> L2-normalised float32 embeddings [N, E] on the device."""
        chunks = [
            self._encode_text_batch(self.tokenizer(texts[i : i + TEXT_BATCH_SIZE]))
            for i in range(0, len(texts), TEXT_BATCH_SIZE)
        ]
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    def _encode_text_batch(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        tower = self.model.text if hasattr(self.model, "text") else self.model
        if not _can_trim_context(tower):
            return self.model.encode_text(tokens)  # type: ignore[no-any-return]
        return encode_text_trimmed(tower, tokens)


def _can_trim_context(tower: Any) -> bool:
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    return (
        all(getattr(tower, attr, None) is not None for attr in _TRIMMABLE_TEXT_ATTRS)
        and pool == "argmax"
        and getattr(tower, "cls_emb", None) is None
    )


def encode_text_trimmed(tower: Any, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's text encoder, cut to the longest prompt in the batch.

    The text transformer is causal and pools at the end-of-text token (the largest id), so the
    padding after the longest prompt cannot change any embedding; dropping it saves most of the
    work for short policy descriptions.
    """
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    projection = tower.text_projection
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection  # type: ignore[no-any-return]


def load_clip(config: ModelConfig) -> ClipModel:
    """Create the model on its device. Raises ModelLoadError with a message a person can act on."""
    if config.pretrained is None and not config.allow_random_weights:
        raise ConfigError(
            "--pretrained none gives random weights, which moderate nothing; "
            "add --allow-random-weights if you really want that (benchmarks only)"
        )
    if config.config_path is not None:
        open_clip.add_model_config(config.config_path)
    verify_weights(config)
    threads = config.threads or usable_cpus()
    torch.set_num_threads(threads)
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    pretrained = describe_pretrained(config)
    if config.pretrained is None:
        log.warning(
            "!!! RANDOM WEIGHTS: model %s has no pretrained weights; its decisions are "
            "meaningless. Use this for benchmarks only. !!!",
            config.name,
        )
    try:
        model = open_clip.create_model(
            config.name, pretrained=config.pretrained, device=device, precision=TEXT_PRECISION
        )
        cast_image_tower(model, dtype)
        tokenizer = open_clip.get_tokenizer(config.name)
    except Exception as exc:  # open_clip raises many types for missing weights or names
        raise ModelLoadError(_load_failure_message(config, exc)) from exc
    model.eval()
    info = ModelInfo(
        model_id=f"{config.name}/{pretrained}",
        name=config.name,
        pretrained=pretrained,
        device=str(device),
        precision=_OPEN_CLIP_PRECISION[dtype],
        weights_key=weights_key(config),
    )
    log.info("loaded model %s on %s in %s", info.model_id, info.device, info.precision)
    return ClipModel(model, tokenizer, device, dtype, info)


def cast_image_tower(model: Any, dtype: torch.dtype) -> None:
    """Cast the image tower as open_clip's create_model(precision="bf16"/"fp16") casts it: for
    native towers the linear, conv and attention weights, with layer norms computed in fp32;
    timm towers whole. The outputs are identical (tested). The text tower stays fp32."""
    if dtype == torch.float32:
        return
    visual = model.visual
    for module in visual.modules():
        if type(module) is LayerNorm:  # what open_clip builds for a low-precision model
            module.__class__ = LayerNormFp32
    if isinstance(visual, TimmModel):
        visual.to(dtype)
        for module in visual.modules():
            if isinstance(module, LayerNormFp32):
                module.float()
    else:
        convert_weights_to_lp(visual, dtype)


def _load_failure_message(config: ModelConfig, exc: Exception) -> str:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"cannot load model {config.name!r} with pretrained={config.pretrained!r}: {reason}\n"
        "If this machine is offline, download the weights elsewhere and pass "
        "--pretrained PATH (a local open_clip checkpoint), or run the bundled demo model "
        "with --demo."
    )
