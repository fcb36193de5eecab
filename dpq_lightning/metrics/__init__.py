"""Sample-quality metrics.

- The digits miniature: :func:`proxy_metrics` (FID/KID/IS-proxy and agreement from a small digits
  CNN, :class:`DigitsClassifier`, shipped as ``checkpoints/digits_classifier.pt``).
- Image models: :func:`image_metrics` (FID, sFID, IS, KID, precision, recall with the FID
  Inception, :func:`inception_extractor`) and :func:`write_adm_npz` for ADM's evaluation suite.

All statistics are computed by torchmetrics (FID, also from stored statistics; KID; IS) and
torch-fidelity (precision/recall) on features extracted once per image set.
"""

from .core import (
    PrecomputedFeatures,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    is_from_logits,
    kid_from_features,
    precision_recall,
    write_adm_npz,
)
from .digits import (
    CLASSIFIER_PATH,
    DigitsClassifier,
    classifier_accuracy,
    classifier_outputs,
    digits_split,
    load_digits_classifier,
    proxy_metrics,
    train_classifier,
)
from .inception import (
    InceptionFeatureExtractor,
    extract_all,
    image_metrics,
    inception_extractor,
    load_reference,
    reference_stats,
    save_reference_npz,
    state_dict_from_fid_helper,
)

FeatureExtractor = InceptionFeatureExtractor  # the protocol: uint8 [N,3,H,W] -> [N, num_features]

__all__ = [
    "PrecomputedFeatures", "feature_stats", "fid_from_features", "fid_from_stats", "is_from_logits",
    "kid_from_features", "precision_recall", "write_adm_npz",
    "CLASSIFIER_PATH", "DigitsClassifier", "classifier_accuracy", "classifier_outputs", "digits_split",
    "load_digits_classifier", "proxy_metrics", "train_classifier",
    "FeatureExtractor", "InceptionFeatureExtractor", "extract_all", "image_metrics", "inception_extractor",
    "load_reference", "reference_stats", "save_reference_npz", "state_dict_from_fid_helper",
]
