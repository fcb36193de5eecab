"""The one SD-VAE loader (latent extraction, evaluation of latent models, pipelines).

``diffusers.AutoencoderKL`` in eval mode, without gradients: from a local ``save_pretrained``
folder when ``path`` is given, else ``stabilityai/sd-vae-ft-{name}`` from the Hugging Face Hub
(or its cache). Offline or missing weights raise :class:`VAEError`, one line that says what to
download and which flag takes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class VAEError(FileNotFoundError):
    """The VAE cannot be loaded; the message says what to do."""


def load_vae(name: str | None = "ema", path: str | os.PathLike | None = None,
             device: str | torch.device = "cpu", flag: str = "--vae-path"):
    """``AutoencoderKL`` from ``path`` (a diffusers folder) or the Hub repo of ``name``.
    ``flag``: how the caller's user passes ``path`` (named in the error messages)."""
    from diffusers import AutoencoderKL

    repo = VAE_REPOS.get(name or "ema")
    if path is not None:
        where = Path(path).expanduser()
        if not (where / "config.json").is_file():
            raise VAEError(f"{flag} {where} has no config.json: it must be a diffusers AutoencoderKL folder, e.g."
                           f" `huggingface-cli download {repo or VAE_REPOS['ema']} --local-dir {where}`")
        try:
            model = AutoencoderKL.from_pretrained(str(where), low_cpu_mem_usage=False)
        except Exception as err:  # noqa: BLE001 - any loader failure becomes one readable line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise VAEError(f"{flag} {where}: cannot load AutoencoderKL: {first}") from err
    else:
        if repo is None:
            raise VAEError(f"--vae must be one of {sorted(VAE_REPOS)} (or give {flag}), got {name!r}")
        try:
            model = AutoencoderKL.from_pretrained(repo, low_cpu_mem_usage=False)
        except Exception as err:  # noqa: BLE001 - offline hub errors are long and misleading
            raise VAEError(f"cannot load the SD-VAE {repo} (offline, or not in the Hugging Face cache): on a machine "
                           f"with internet run `huggingface-cli download {repo} --local-dir DIR`, then pass {flag} DIR"
                           ) from err
    return model.to(device).eval().requires_grad_(False)
