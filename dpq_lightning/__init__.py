"""dpq_lightning: Diffusion Product Quantization for diffusion transformers."""

__version__ = "0.1.0"
