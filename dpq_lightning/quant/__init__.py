"""Stage 1 of DPQ as pure tensor math: sub-vectors, k-means, codebook pool, size accounting,
the PQ modules, and ``quantize_(model, cfg) -> SizeReport``. Imports only torch (faiss is an
optional accelerator, imported lazily when asked for)."""

from .accounting import ParamSize, SizeReport
from .budget import BudgetError
from .config import BudgetConfig, LayerRule, PoolConfig, QuantConfig, QuantConfigError
from .geometry import Geometry, GeometryError
from .layers import PQ_MODULES, PQConv2d, PQEmbedding, PQLinear, PQWeight
from .quantize import predict_report, quantize_, report_of, round_to_storage_

__all__ = [
    "BudgetConfig", "BudgetError", "Geometry", "GeometryError", "LayerRule", "PQ_MODULES", "PQConv2d",
    "PQEmbedding", "PQLinear", "PQWeight", "ParamSize", "PoolConfig", "QuantConfig", "QuantConfigError",
    "SizeReport", "predict_report", "quantize_", "report_of", "round_to_storage_",
]
