"""Workers: data, models, training (Ray Train), pool scoring (Ray Data), SAM and tracking (MLflow).

Heavy dependencies (torch, Ray, MLflow) are imported when a name that needs them is first used, so
``import workers`` stays cheap for the CLI and the strategies.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClassInfo": "_data",
    "DatasetRecord": "_data",
    "SYNTHETIC_CLASSES": "_data",
    "generate_synthetic": "_data",
    "read_classes": "_data",
    "scan_folder_dataset": "_data",
    "load_image": "_data",
    "load_mask": "_data",
    "build_model": "_models",
    "check_model": "_models",
    "model_names": "_models",
    "load_checkpoint": "_models",
    "TrainSpec": "_train",
    "to_tensor": "_train",
    "TrainResult": "_train",
    "WeightedDistributedSampler": "_train",
    "train": "_train",
    "train_loop": "_train",
    "evaluate_dataset": "_train",
    "Evaluation": "_train",
    "LossSpec": "_losses",
    "SegmentationLoss": "_losses",
    "class_weights_from_counts": "_losses",
    "AugmentSpec": "_augment",
    "Augmenter": "_augment",
    "SegmentationMetrics": "_metrics",
    "metrics_from_confusion": "_metrics",
    "ScoreResult": "_score",
    "PoolScorer": "_score",
    "SCORED_COLUMNS": "_score",
    "CLASSWEIGHTED_COLUMNS": "_score",
    "class_pixel_weights": "_score",
    "INVENTORY_COLUMNS": "_inventory",
    "inspect_images": "_inventory",
    "inspect_one": "_inventory",
    "FEATURE_COLUMNS": "_features",
    "compute_features": "_features",
    "image_features": "_features",
    "score_pool": "_score",
    "read_scores": "_score",
    "ensure_ray": "_ray",
    "relate_to_iou": "_review",
    "label_issue_columns": "_review",
    "LABEL_ISSUE": "_review",
    "QUALITY_COLUMNS": "_review",
    "Tracker": "_tracking",
    "default_tracking_uri": "_tracking",
    "source_tags": "_tracking",
    "TAG_DATASET": "_tracking",
    "TAG_STRATEGY": "_tracking",
    "class_colors": "_figures",
    "count_class_pixels": "_figures",
    "learning_curve_auc": "_figures",
    "plot_class_distribution": "_figures",
    "plot_confusion_matrix": "_figures",
    "plot_learning_curve": "_figures",
    "plot_thumbnails": "_figures",
    "plot_weights_histogram": "_figures",
    "predict_masks": "_figures",
    # SAM: prompts, embedding cache, model and engine, the extended scoring pass
    "ImagePrompts": "_prompts",
    "PromptSpec": "_prompts",
    "agreement_columns": "_prompts",
    "component_iou": "_prompts",
    "jitter_prompts": "_prompts",
    "prompts_from_mask": "_prompts",
    "EmbeddingCache": "_sam_cache",
    "SamEmbedding": "_sam_cache",
    "SamEngine": "_sam",
    "SamFinetuneSpec": "_sam",
    "SamSpec": "_sam",
    "build_sam": "_sam",
    "finetune_decoder": "_sam",
    "load_decoder": "_sam",
    "new_sam": "_sam",
    "register_sam_model": "_sam",
    "sam_checkpoint_id": "_sam",
    "sam_model_types": "_sam",
    "POOL_FLAG": "_score_pass",
    "PassResult": "_score_pass",
    "PassScorer": "_score_pass",
    "PassSpec": "_score_pass",
    "SamPreannotator": "_score_pass",
    "finetune_sam_decoder": "_score_pass",
    "read_embeddings": "_score_pass",
    "sam_preannotate": "_score_pass",
    "score_pool_pass": "_score_pass",
    # Regions: proposals and their cache, region scoring, the simulated region oracle, partial masks
    "REGION_METHODS": "_regions",
    "RegionCache": "_regions",
    "RegionProposer": "_regions",
    "RegionSpec": "_regions",
    "masks_to_regions": "_regions",
    "propose_regions": "_regions",
    "resize_regions": "_regions",
    "tidy_regions": "_regions",
    "REGION_SCORED_COLUMNS": "_region_score",
    "RegionScoreResult": "_region_score",
    "RegionScorer": "_region_score",
    "region_rows": "_region_score",
    "score_regions": "_region_score",
    "file_digest": "_sam_cache",
    "RegionLabeling": "_region_oracle",
    "image_annotation_costs": "_region_oracle",
    "label_regions": "_region_oracle",
    "labeled_pixel_count": "_region_oracle",
    "labeled_pixels_per_sample": "_region_oracle",
    "merge_partial_masks": "_region_oracle",
    "write_mask": "_region_oracle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workers' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
