"""DiT construction, loading (original and diffusers formats) and block hooks."""

from .dit import DiT, DiTConfig, get_2d_sincos_pos_embed, timestep_embedding
from .factory import build_model
from .hooks import BlockOutputRecorder
from .loading import (
    DIFFUSERS_HUB_ID,
    ORIGINAL_CHECKPOINT_URL,
    CheckpointMismatchError,
    WeightsNotFoundError,
    check_state_dict,
    config_from_diffusers,
    from_diffusers,
    load_diffusers,
    load_original_checkpoint,
    load_pretrained,
    to_diffusers,
)
from .registry import DIT_ARCHS, build_dit, get_config, known_models, resolve_config

__all__ = [
    "DiT",
    "DiTConfig",
    "get_2d_sincos_pos_embed",
    "timestep_embedding",
    "BlockOutputRecorder",
    "build_model",
    "DIFFUSERS_HUB_ID",
    "ORIGINAL_CHECKPOINT_URL",
    "CheckpointMismatchError",
    "WeightsNotFoundError",
    "check_state_dict",
    "config_from_diffusers",
    "from_diffusers",
    "load_diffusers",
    "load_original_checkpoint",
    "load_pretrained",
    "to_diffusers",
    "DIT_ARCHS",
    "build_dit",
    "get_config",
    "known_models",
    "resolve_config",
]
