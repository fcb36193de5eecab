"""``dpq export FILE --format diffusers --out DIR``: a DiT (packed, calibration checkpoint or float)
as a folder diffusers loads.

What is written (built in a temp folder beside ``DIR``, then renamed into place):

* ``DIR/transformer/``: a ``DiTTransformer2DModel`` (``config.json`` + safetensors, fp32). Every PQ
  layer is decoded to its dense float weight first (:func:`dequantized`); diffusers' layout repeats
  the timestep MLP and class table in every block (``models.loading.diffusers_state_dict_from_dit``);
* ``DIR/scheduler/``: the ``DDIMScheduler`` of the schedule every model here was trained with
  (1000 linear betas 1e-4 .. 0.02, epsilon);
* with ``--vae-path``: ``DIR/vae/`` and ``DIR/model_index.json`` (``DiTPipeline.save_pretrained``),
  so ``DiTPipeline.from_pretrained(DIR)`` works; without, no ``model_index.json``;
* ``DIR/dpq_export.json``: where it came from and the parameter counts.

One difference cannot be stored: diffusers' DiT computes its timestep features with
``downscale_freq_shift=1`` (frequencies ``10000**(-i/(half-1))``), the original DiT (and ours) with 0,
and diffusers' config has no field for it. ``from_pretrained`` therefore gives diffusers' function
(as for diffusers' own ``facebook/DiT-XL-2-256``); :func:`load_transformer` reloads the folder and
sets the shift back, which gives exactly the exported model's function.

:func:`load_compressed_into_diffusers` is the other route: a ``DiTTransformer2DModel`` in memory
whose layers are the packed model's PQ modules (weights decoded on every forward) and whose blocks
all hold one shared embedder. It cannot be saved in a form ``from_pretrained`` reloads compressed
(``docs/export.md``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.dit import DiT
from ..models.loading import (_BLOCK_KEYS, _TOP_KEYS, CheckpointMismatchError, _assign, _diffusers_kwargs,
                              check_state_dict, to_diffusers)
from ..quant.accounting import unique_bytes
from ..quant.layers import PQ_MODULES

FORMATS = ("diffusers",)
EXPORT_INFO = "dpq_export.json"
# facebookresearch/DiT's diffusion (dpq_lightning.diffusion.Schedule.linear), as diffusers' DDIM.
SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, clip_sample=False, prediction_type="epsilon",
                                        set_alpha_to_one=True)
DIFFUSERS_NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional label


class ExportError(ValueError):
    """An export cannot be done as asked; the message names the file or option and what to do."""


# ------------------------------------------------------------------------------ loading / decoding


def load_source(path: str | os.PathLike, model_name: str | None = None, image_size: int = 256,
                num_classes: int = 1000, arch_json: str | None = None) -> DiT:
    """The model in ``path`` (``.dpq``, calibration ``.ckpt`` or float ``.pt``), as ``dpq sample``
    reads it (:func:`dpq_lightning.export.open.open_model`), on the CPU in eval mode."""
    from .open import open_model

    path = Path(path)
    try:
        model = open_model(path, model_name, image_size, num_classes, arch_json, "cpu")
    except CheckpointMismatchError as err:
        if path.suffix in (".dpq", ".ckpt") or arch_json is not None:
            raise
        # A float checkpoint is read against an architecture; the default (DiT-XL/2 at 256) rarely fits
        # a small model, so say how to name the right one.
        raise ExportError(f"{path} is a float DiT checkpoint that does not fit the architecture it was read with "
                          f"(--model {model_name or 'DiT-XL/2'} --image-size {image_size} --num-classes {num_classes}):"
                          f" give its architecture with --arch-json FILE (e.g. checkpoints/digits_teacher.json) or "
                          f"the right --model/--image-size/--num-classes. Details: {err}") from err
    if not isinstance(model, DiT):
        raise ExportError(f"{path}: holds a {type(model).__name__}; only DiT models can be exported to diffusers")
    return model


def is_compressed(model: nn.Module) -> bool:
    """Whether ``model`` holds any product-quantized layer."""
    return any(isinstance(m, PQ_MODULES) for m in model.modules())


@torch.no_grad()
def dequantized(model: DiT) -> DiT:
    """A plain fp32 ``DiT`` computing what ``model`` computes: every PQ layer replaced by a float
    layer holding its decoded weight (codes looked up in their codebooks / pool). A model without
    PQ layers in fp32 is returned as it is (no copy)."""
    pq = {name: mod for name, mod in model.named_modules() if isinstance(mod, PQ_MODULES)}
    if not pq and all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point()):
        return model
    prefixes = tuple(f"{name}." for name in pq)
    # Everything outside the PQ modules (floats, pos_embed) as is; PQ codes/codebooks are skipped.
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, mod in pq.items():
        state[f"{name}.weight"] = mod.weight_pq().detach().float().cpu()  # dense, the layer's own shape
        if getattr(mod, "bias", None) is not None:
            state[f"{name}.bias"] = mod.bias.detach().float().cpu()
    with torch.device("meta"):
        out = DiT(model.config)
    check_state_dict(state, out.state_dict(), "decoded PQ model")
    return _assign(out, state, torch.float32).eval()


# ----------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """What :func:`export_diffusers` wrote, and the counts it prints."""

    out: Path
    written: list[str]
    params_ours: int  # learnable parameters of our DiT (each embedder once)
    params_diffusers: int  # parameters of the DiTTransformer2DModel (embedders in every block)
    params_embedders: int  # one copy of the timestep MLP + class table
    depth: int
    compressed: bool
    with_vae: bool
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The command's report, one line per item."""
        extra = self.params_diffusers - self.params_ours
        out = [f"wrote {self.out}/{w}" for w in self.written]
        out.append(f"parameters: diffusers {self.params_diffusers:,} = ours {self.params_ours:,} + {extra:,} "
                   f"(diffusers repeats the timestep/class embedders, {self.params_embedders:,} parameters, "
                   f"in each of the {self.depth} blocks: {self.depth - 1} extra copies)")
        if self.compressed:
            out.append("weights: the PQ codes decoded to dense fp32 (the folder holds no compressed weights)")
        if self.with_vae:
            out.append(f"load: DiTPipeline.from_pretrained('{self.out}')")
        else:
            out.append(f"no VAE: load the transformer with DiTTransformer2DModel.from_pretrained('{self.out}', "
                       f"subfolder='transformer'); for a DiTPipeline (latent models) export again with "
                       f"--vae-path VAE_DIR, or build DiTPipeline(transformer=..., "
                       f"vae=AutoencoderKL.from_pretrained(VAE_DIR), scheduler=DDIMScheduler.from_pretrained("
                       f"'{self.out}', subfolder='scheduler'))")
        return out + [f"note: {n}" for n in self.notes]


def check_target(out: Path, force: bool) -> None:
    """``out`` may be written: absent, an empty folder, or (``force``) a non-empty folder."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; give --force to replace it, or another --out")


def make_scheduler():
    """The DDIM scheduler of the project's linear-beta diffusion."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def export_diffusers(model: DiT, out: str | os.PathLike, vae_path: str | os.PathLike | None = None,
                     force: bool = False, source: str | None = None) -> ExportResult:
    """Write ``model`` (PQ or float DiT) as a diffusers folder at ``out``; see the module docstring.

    ``out`` must be absent or empty unless ``force``. Nothing is visible under ``out`` until the
    whole folder is written: it is built beside it and renamed into place."""
    from diffusers import DiTPipeline

    out = Path(out)
    check_target(out, force)
    cfg = model.config
    notes = []
    vae = None
    if vae_path is not None:
        from ..models.vae import load_vae

        vae = load_vae(None, vae_path)  # a missing/broken folder fails here, before any work
        if vae.config.latent_channels != cfg.in_channels:
            raise ExportError(f"--vae-path {vae_path}: the VAE has {vae.config.latent_channels} latent channels, "
                              f"the model {cfg.in_channels}; give the VAE the model was trained with")
    if cfg.num_classes != DIFFUSERS_NULL_CLASS:
        notes.append(f"the model has {cfg.num_classes} classes (null class {cfg.num_classes}); DiTPipeline "
                     f"uses label {DIFFUSERS_NULL_CLASS} as the null class, so call it with guidance_scale=1 "
                     f"(classifier-free guidance needs num_classes=1000)")
    notes.append("diffusers' DiT computes timestep features with downscale_freq_shift=1 (the original DiT: 0; "
                 "not storable in its config); for this model's exact function load the transformer with "
                 "dpq_lightning.export.diffusers.load_transformer(DIR)")
    float_model = dequantized(model)
    dmodel = to_diffusers(float_model, original_timestep_freqs=False).eval()  # the patch is not saved anyway
    result = ExportResult(out, [], count_learnable(float_model), sum(p.numel() for p in dmodel.parameters()),
                          embedder_params(float_model), cfg.depth, is_compressed(model), vae is not None, notes)
    scheduler = make_scheduler()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if vae is not None:
            DiTPipeline(transformer=dmodel, vae=vae, scheduler=scheduler).save_pretrained(tmp)
            result.written = ["transformer", "scheduler", "vae", "model_index.json"]
        else:
            dmodel.save_pretrained(tmp / "transformer")
            scheduler.save_pretrained(tmp / "scheduler")
            result.written = ["transformer", "scheduler"]
        info = {"source": source, "format": "diffusers", "compressed": result.compressed,
                "dit_config": cfg.to_dict(), "params_ours": result.params_ours,
                "params_diffusers": result.params_diffusers,
                "exact_function": "load_transformer(DIR): from_pretrained + time_proj.downscale_freq_shift=0",
                "notes": notes}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
        result.written.append(EXPORT_INFO)
        _umask_permissions(tmp)
        _publish(tmp, out)
    except BaseException:  # an error or Ctrl-C: no half-written folder left beside DIR
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _umask_permissions(root: Path) -> None:
    """Give every file under ``root`` the umask's permissions, like any file the user writes
    (diffusers' safetensors files come out 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` is moved aside first and
    removed only once the new folder is in place (restored if that rename fails)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def export_file(path: str | os.PathLike, out: str | os.PathLike, fmt: str = "diffusers",
                vae_path: str | None = None, force: bool = False, model_name: str | None = None,
                image_size: int = 256, num_classes: int = 1000, arch_json: str | None = None) -> list[str]:
    """``dpq export``: load ``path``, export it, return the report lines (what was written, the
    parameter counts and, for a compressed model, the memory of each way of holding it)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; supported: {', '.join(FORMATS)}")
    check_target(Path(out), force)  # before loading anything
    model = load_source(path, model_name, image_size, num_classes, arch_json)
    result = export_diffusers(model, out, vae_path, force, source=str(path))
    lines = result.lines()
    if result.compressed:
        mib = lambda n: f"{n / 2**20:.3f} MiB"  # noqa: E731
        folder = sum(f.stat().st_size for f in (result.out / "transformer").iterdir())
        lines.append(f"on disk: {path} {mib(Path(path).stat().st_size)}, {result.out}/transformer {mib(folder)}")
        lines.append(f"in memory: exported fp32 transformer {mib(unique_bytes(load_transformer(result.out)))}; "
                     f"compressed in diffusers (load_compressed_into_diffusers: PQ layers, one shared embedder) "
                     f"{mib(unique_bytes(load_compressed_into_diffusers(model)))}")
    return lines


def load_transformer(path: str | os.PathLike, original_timestep_freqs: bool = True):
    """``DiTTransformer2DModel.from_pretrained(path, subfolder="transformer")`` (eval mode) with,
    by default, every block's timestep features set back to the original DiT's
    (``downscale_freq_shift=0``): then it computes exactly the exported model's function."""
    from diffusers import DiTTransformer2DModel

    dmodel = DiTTransformer2DModel.from_pretrained(str(path), subfolder="transformer",
                                                   low_cpu_mem_usage=False).eval()  # no accelerate needed
    if original_timestep_freqs:
        for block in dmodel.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    return dmodel


# ---------------------------------------------------------------------- compressed, in memory


class QKVPart(nn.Module):
    """One of diffusers' ``to_q`` / ``to_k`` / ``to_v``: rows ``[part*h, (part+1)*h)`` of our fused
    ``qkv`` Linear (PQ or float). The three parts hold the same module, so its codes and codebooks
    are stored once; a PQ ``qkv`` is decoded once per part per call (3x the decode work)."""

    def __init__(self, qkv: nn.Module, part: int):
        super().__init__()
        self.qkv = qkv
        self.part = part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qkv.weight  # (3h, h), decoded from the codes for a PQLinear
        h = w.shape[0] // 3
        rows = slice(self.part * h, (self.part + 1) * h)
        bias = None if self.qkv.bias is None else self.qkv.bias[rows]  # (h,)
        return F.linear(x, w[rows], bias)  # (..., h)


def _put(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@lru_cache(maxsize=None)
def compressed_model_class() -> type:
    """``CompressedDiTTransformer2DModel``: a ``DiTTransformer2DModel`` (``DiTPipeline`` takes it)
    whose ``save_pretrained`` refuses. Measured with diffusers 0.42: the default safetensors save
    fails on the shared tensors, and ``safe_serialization=False`` writes a ``.bin`` whose keys
    (``...weight_pq.codes``) ``from_pretrained`` ignores, returning a randomly initialised model
    with only a warning. Refusing turns that silent garbage into an error that says what works."""
    from diffusers import DiTTransformer2DModel

    class CompressedDiTTransformer2DModel(DiTTransformer2DModel):
        def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError(
                "a DiTTransformer2DModel holding PQ layers cannot be saved so that from_pretrained reloads it "
                "(diffusers builds plain Linear layers and would ignore the codes); keep the packed .dpq "
                "(dpq_lightning.export.packed.save_packed) and rebuild with load_compressed_into_diffusers, or write "
                "dense weights with `dpq export FILE --format diffusers --out DIR`")

    return CompressedDiTTransformer2DModel


def load_compressed_into_diffusers(model: DiT):
    """A ``DiTTransformer2DModel`` (eval mode) that computes ``model``'s function with ``model``'s
    own layers: PQ layers stay compressed (weights decoded on every forward), ``to_q/k/v`` are
    :class:`QKVPart` views of the fused ``qkv``, and every block's ``norm1.emb`` is ONE shared
    embedder (timestep MLP + class table stored once, not ``depth`` times). Timestep features use
    the original DiT's frequencies (``downscale_freq_shift=0``).

    The returned model shares its modules and tensors with ``model`` (nothing is copied). It is for
    use in memory (e.g. as ``DiTPipeline(transformer=...)``): its ``save_pretrained`` raises, as no
    form of it reloads compressed (:func:`compressed_model_class`, ``docs/export.md``)."""
    cfg = model.config
    with torch.device("meta"):  # a skeleton: every weight is replaced below, none is allocated
        dmodel = compressed_model_class()(**_diffusers_kwargs(cfg))
    ours = dict(model.named_modules())
    for dname, name in _TOP_KEYS.items():
        _put(dmodel, dname, ours[name])
    for i in range(cfg.depth):
        for dsuffix, name in _BLOCK_KEYS.items():
            _put(dmodel, f"transformer_blocks.{i}.{dsuffix}", ours[f"blocks.{i}.{name}"])
        for part, n in enumerate("qkv"):
            _put(dmodel, f"transformer_blocks.{i}.attn1.to_{n}", QKVPart(ours[f"blocks.{i}.attn.qkv"], part))
    emb = dmodel.transformer_blocks[0].norm1.emb
    emb.timestep_embedder.linear_1 = model.t_embedder.mlp[0]
    emb.timestep_embedder.linear_2 = model.t_embedder.mlp[2]
    emb.class_embedder.embedding_table = model.y_embedder.embedding_table
    emb.time_proj.downscale_freq_shift = 0  # the original DiT's timestep features
    for block in dmodel.transformer_blocks:
        block.norm1.emb = emb  # one module, shared: diffusers calls it per block, it is stored once
    # diffusers' sin-cos table (a non-persistent buffer, built on meta above) -> ours, (1, T, hidden).
    dmodel.pos_embed.register_buffer("pos_embed", model.pos_embed.detach().float().clone(), persistent=False)
    left = [n for n, t in chain(dmodel.named_parameters(), dmodel.named_buffers()) if t.is_meta]
    if left:
        import diffusers

        raise RuntimeError(f"DiTTransformer2DModel of diffusers {diffusers.__version__} has {left[0]!r}, which "
                           f"the mapping from our DiT does not fill ({len(left)} tensor(s))")
    return dmodel.eval()


# ------------------------------------------------------------------------------------------ counts


def count_learnable(model: nn.Module) -> int:
    """Learnable parameters (our ``pos_embed`` is a fixed table, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def embedder_params(model: DiT) -> int:
    """One copy of the shared conditioning of a float DiT: timestep MLP + class table (null row included)."""
    return sum(p.numel() for p in chain(model.t_embedder.parameters(), model.y_embedder.parameters()))
