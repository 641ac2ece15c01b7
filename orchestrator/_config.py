"""Typed experiment configuration, loaded from YAML and validated where it is built.

Every section is a frozen dataclass. Unknown keys, wrong types and bad values raise ``ValueError``
naming the key path (``train.epochs``), so a misspelled key never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "shoal"
    seed: int = 0


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int = 192
    num_val: int = 48
    height: int = 96
    width: int = 128
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["synthetic", "folder"] = "synthetic"
    """``synthetic``: the built-in subsea generator, written once under the work dir.
    ``folder``: ``train_dir`` (the pool) holds ``images/`` and, for some images or all, ``masks/``;
    ``val_dir``, when given, holds ``images/`` and ``masks/`` for every image."""
    train_dir: str | None = None
    val_dir: str | None = None
    """A validation folder; null = hold out ``val_share`` of the labeled pool images instead."""
    masks: Literal["auto", "labels", "ground_truth"] = "auto"
    """What the masks in ``train_dir/masks`` are. ``labels``: an image with a mask is labeled from the
    start (the seed set, round 0), an image without one is in the unlabeled pool, and no masks at all
    means nothing is labeled yet. ``ground_truth`` (benchmarks): every mask is hidden truth, revealed
    by the simulated oracle when its image is selected; ``loop.initial_labeled`` images start labeled.
    ``auto``: ``ground_truth`` when every pool image has a mask, else ``labels``."""
    write_back_masks: bool = False
    """With people labeling: every whole mask they return is also written next to its image, to
    ``masks/<image stem>.png`` beside the pool's ``images/`` (a local folder or a bucket), so the
    pool folder stays the dataset of record (a later experiment reads them as seed labels). Region
    answers (partial masks) are not written back."""
    val_share: float = 0.2
    """Without ``val_dir``: the share of labeled pool images held out for validation and never trained
    on, chosen by a hash of the sample id (an image never moves between training and validation);
    at least one once two images are labeled. In (0, 1)."""
    image_size: tuple[int, int] = (96, 128)
    """(height, width) that images and masks are resized to inside the workers."""
    skip_unreadable: bool = False
    """Every train (pool) image is decoded once when the experiment starts. An unreadable one
    (corrupt, truncated, empty): ``false`` refuses to start, naming the file; ``true`` logs it and
    leaves it out of the sample table (never scored, never selected), listed with the reason in
    ``<workdir>/unreadable.csv``, which every round's MLflow run carries as an artifact."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "unet"
    options: dict[str, Any] = field(default_factory=dict)
    """Passed to the model builder (``unet``: base_channels, depth, dropout; ``segformer``:
    pretrained, config)."""


@dataclass(frozen=True)
class LossConfig:
    """The training loss: ``pixel_weight * pixel term + dice_weight * Dice``; the name picks the
    terms (see ``workers/_losses.py`` for the exact definitions and reductions)."""

    name: Literal["ce", "dice", "ce_dice", "focal", "focal_dice", "ohem", "ohem_dice"] = "ce"
    """``ce`` cross-entropy; ``focal``; ``ohem`` cross-entropy over the hardest pixels only;
    ``dice`` soft Dice per image (a class absent from an image's truth and prediction scores 1);
    ``<ce|focal|ohem>_dice`` the sum of both terms."""
    pixel_weight: float = 1.0
    """Weight of the pixel term (cross-entropy, focal or OHEM) in a combined loss."""
    dice_weight: float = 1.0
    """Weight of the Dice term."""
    class_weights: Literal["none", "inverse", "median"] = "none"
    """Class weights of the pixel term, from the labeled set's pixel counts (computed each round):
    ``inverse`` frequency (a class of average frequency weighs 1) or ``median`` frequency
    balancing (Eigen & Fergus)."""
    class_weight_cap: float = 10.0
    """Upper bound on every class weight."""
    focal_gamma: float = 2.0
    """Focusing exponent of the focal loss (0 = cross-entropy)."""
    ohem_top_k_min: float = 0.25
    """Share of the valid pixels that OHEM keeps once annealed, in (0, 1]."""
    ohem_anneal_steps: int = 500
    """Optimiser steps over which OHEM's kept share falls linearly from 1 to ``ohem_top_k_min``."""
    dice_smooth: float = 1.0
    """Smoothing of the soft Dice, in pixels."""
    imbalance: Literal["auto", "off"] = "auto"
    """``auto``: a round whose labeled set is imbalanced (the rarest class present holds under
    ``imbalance_threshold`` of the labeled pixels) trains with ``imbalance_loss`` and
    ``imbalance_class_weights`` instead of ``name`` and ``class_weights``, and says so (the round's
    ``loss_used`` param); ``off``: always ``name`` and ``class_weights``."""
    imbalance_threshold: float = 0.01
    """Share of the labeled pixels under which the rarest class makes the set imbalanced, in (0, 1)."""
    imbalance_loss: Literal["ce", "dice", "ce_dice", "focal", "focal_dice", "ohem", "ohem_dice"] = "ce"
    """The loss of imbalanced rounds (the default chosen on KolektorSDD: benchmarks/results/rare_recipe.md)."""
    imbalance_class_weights: Literal["none", "inverse", "median"] = "median"
    """The class weights of imbalanced rounds."""
    imbalance_sampling: Literal["rare_images", "none"] = "rare_images"
    """``rare_images``: imbalanced rounds also draw the images holding a class under
    ``imbalance_threshold`` more often (``f_max / f_c`` of its rarest such class, capped at
    ``class_weight_cap``; ``workers._losses.rare_image_factors``), on top of the sample weights;
    with 2 defect images of 20 it doubled the defect IoU (benchmarks/results/rare_recipe_first_round.md).
    ``none``: drawn by the sample weights only."""


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations; image and mask always move together."""

    hflip: bool = True
    """Mirror left-right with probability 1/2."""
    vflip: bool = False
    """Mirror top-bottom with probability 1/2 (top-down or texture imagery only)."""
    scale_range: tuple[float, float] = (1.0, 1.0)
    """Random resize factor range; [1, 1] = off. Combine with ``crop`` (e.g. [0.75, 1.5])."""
    crop: tuple[int, int] | None = None
    """(height, width) random crop after scaling, padded with ignored pixels when larger than the
    scaled image; null = data.image_size."""
    color_jitter: float = 0.0
    """Brightness, contrast and saturation factors drawn from [1 - s, 1 + s]; 0 = off."""
    hroll: bool = False
    """Circular left-right roll by a random offset, for 360-degree panoramas and unrolled pipe walls."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    samples_per_epoch: int | None = None
    """Samples drawn (by weight, with replacement) per epoch; None = the labeled count."""
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    num_workers: int = 1
    """Training workers (DDP ranks). 0 runs the training function in the driver process; 1 runs it
    as one Ray task that reuses a warm worker process across rounds; 2 or more train with DDP under a
    Ray Train TorchTrainer."""
    launcher: Literal["auto", "ray_train"] = "auto"
    """``auto``: as ``num_workers`` says; ``ray_train``: a Ray Train TorchTrainer for one worker too
    (its start-up costs 15-25 s a round on a small machine)."""
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    """Restarts of the Ray Train workers after one dies (a killed process, a lost node); each
    restart resumes from the last epoch's checkpoint. 0 = fail at once; no effect with
    ``num_workers: 0``."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    """SGD momentum (``optimizer: sgd`` only)."""
    schedule: Literal["poly", "cosine"] = "poly"
    """Learning-rate decay to 0 after warm-up: poly (power 0.9) or cosine."""
    warmup_steps: int = 0
    """Optimiser steps of linear learning-rate warm-up."""
    grad_clip: float | None = 5.0
    """Maximum global gradient norm; null = no clipping."""
    amp: bool = True
    """Mixed precision (bfloat16, or float16 with loss scaling) when training on GPU; no effect on CPU."""
    early_stopping_patience: int | None = None
    """Stop a round's training after this many epochs without a better val mIoU; null = never.
    The best epoch's checkpoint is kept either way."""
    init: Literal["scratch", "previous"] = "scratch"
    """Each round starts from fresh weights (``scratch``) or fine-tunes the previous round's best
    checkpoint (``previous``; round 1 starts from scratch)."""
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ScoreConfig:
    num_actors: int = 1
    batch_size: int = 16
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass(frozen=True)
class StoppingConfig:
    """Extra stopping criteria, checked after every round (``loop.rounds`` and an exhausted pool
    always stop); None turns one off."""

    total_budget: int | None = None
    """Stop once this many train samples are labeled (the initial set included)."""
    plateau_rounds: int | None = None
    """Stop when the best val mIoU of the last ``plateau_rounds`` rounds beats the best before them
    by less than ``min_delta``."""
    min_delta: float = 0.005
    """mIoU gain (0..1 units) the plateau criterion counts as progress."""
    uncertainty_threshold: float | None = None
    """Stop when the pool's mean pixel entropy (``entropy_mean`` averaged over the unlabeled pool,
    nats) falls below this."""

    def __post_init__(self) -> None:
        for key in ("total_budget", "plateau_rounds"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"loop.stopping.{key}: must be >= 1 or null, got {value}")
        if not (self.min_delta >= 0):
            raise ValueError(f"loop.stopping.min_delta: must be >= 0, got {self.min_delta}")


@dataclass(frozen=True)
class ReweightingConfig:
    """Training weights of the labeled set, recomputed before every round's training."""

    policy: str = "uniform"
    """``uniform``, ``loss`` (the previous round's per-sample loss plus an offset, max/min ratio
    capped) or ``class_content`` (images holding a rare class weigh its inverse frequency, capped).
    The policy's weight multiplies the table's weight, so ``shoal edit`` weights and exclusions hold."""
    options: dict[str, Any] = field(default_factory=dict)
    """Options of the policy (``loss``: offset, max_ratio; ``class_content``: max_ratio, min_share)."""
    override_file: str | None = None
    """A CSV of ``sample_id,weight`` applied last (0 = kept in the table, never drawn for training)."""

    def __post_init__(self) -> None:
        from strategies import reweighting_names, reweighting_options

        if self.policy not in reweighting_names():
            raise ValueError(f"loop.reweighting.policy: unknown policy '{self.policy}'; "
                             f"valid: {', '.join(reweighting_names())}")
        unknown = sorted(set(self.options) - set(reweighting_options(self.policy)))
        if unknown:
            valid = ", ".join(sorted(reweighting_options(self.policy))) or "none"
            raise ValueError(f"loop.reweighting.options: policy '{self.policy}' has no option '{unknown[0]}'; "
                             f"valid: {valid}")


@dataclass(frozen=True)
class LoopConfig:
    strategy: str = "entropy"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    """Options of the strategy, e.g. ``{aggregation: mean}``; unknown options are an error."""
    initial_labeled: int = 16
    """Samples labeled before the first round, chosen by ``initial_strategy``: revealed at the start
    when the pool's masks are ground truth; asked of people in a labeling round before any training
    when nothing is labeled yet (``data.masks: labels`` with no mask). Not used when seed masks exist."""
    budget: int = 16
    """Samples labeled per round."""
    rounds: int = 3
    """Rounds to run; each trains, scores the pool, selects ``budget`` samples and labels them."""
    initial_strategy: Literal["random", "cold_start"] = "random"
    """How the initial set is chosen before any model exists: at random, or ``cold_start``: spread
    over the pool by cheap colour features (greedy k-center), computed in a Ray Data pass."""
    reweighting: ReweightingConfig = field(default_factory=ReweightingConfig)
    stopping: StoppingConfig = field(default_factory=StoppingConfig)
    unit: Literal["image", "region"] = "image"
    """What a round labels: whole ``image``s (``budget`` images per round, an image strategy) or
    ``region``s (superpixels, grid cells or SAM masks; ``regions.budget_clicks`` clicks per round, a
    region strategy: region_random, region_uncertainty, region_class_balanced). The initial set
    is whole images either way (the same images for the same seed)."""


@dataclass(frozen=True)
class RegionsConfig:
    """Region-level acquisition (``loop.unit: region``): how images are cut into regions, where
    the region maps are cached and how many clicks a round may spend. The parameters are those of
    ``workers.RegionSpec``; maps are made at ``data.image_size``."""

    method: Literal["slic", "sam", "grid"] = "slic"
    """``slic`` superpixels, ``sam`` automatic masks (needs ``sam.enabled``) or ``grid`` cells."""
    min_region_px: int = 16
    """Pieces smaller than this (pixels at data.image_size) join the nearest larger region."""
    n_segments: int = 300
    """slic: the approximate number of superpixels per image."""
    compactness: float = 10.0
    """slic: colour against space; higher = squarer superpixels."""
    sigma: float = 0.0
    """slic: Gaussian smoothing (pixels) before clustering."""
    cell_px: int = 32
    """grid: the side of a cell, in pixels."""
    points_per_side: int = 16
    """sam: a points_per_side x points_per_side grid of point prompts."""
    points_per_batch: int = 64
    """sam: point prompts per mask-decoder call."""
    pred_iou_thresh: float = 0.88
    """sam: masks SAM rates below this predicted IoU are dropped."""
    stability_score_thresh: float = 0.95
    """sam: masks less stable than this are dropped."""
    box_nms_thresh: float = 0.7
    """sam: box IoU above which overlapping masks are suppressed."""
    cache_uri: str | None = None
    """Where region maps are kept across rounds, keyed by image content and the method's
    parameters: a directory or a pyarrow filesystem URI; null = ``<workdir>/region_cache``."""
    initial_clicks: float | None = None
    """The region protocol of the literature (Cai et al. 2021, EquAL, CEREALS): the experiment starts
    from random regions across the pool worth this many clicks (labeled by the simulated oracle at
    their real cost), not from whole images (``loop.initial_labeled`` is then not used). Null:
    start from ``loop.initial_labeled`` whole images."""
    budget_clicks: float | None = None
    """Annotator clicks to spend per round (required with ``loop.unit: region``). Round r may
    spend ``budget_clicks * r`` minus the clicks spent since the initial set, so a round that cost
    more or less than estimated is evened out by the next."""
    train_weighting: Literal["labeled_pixels", "uniform"] = "labeled_pixels"
    """How often training draws a labeled sample (times its weight): ``labeled_pixels``: a whole
    image 1, a partial mask the share of a whole image its labeled pixels make up, so every labeled
    pixel has about the same chance; ``uniform``: a partial mask holding a few regions as often as a
    whole image."""
    queue_factor: float = 2.0
    """The select phase queues regions worth this many times the round's clicks (by the model's
    estimate of each region's cost); the oracle labels them in rank order and stops before the
    round's real clicks would exceed its budget. Estimates are low while the model is poor (an
    untrained model sees every region as pure), so a queue of exactly the budget would leave
    clicks unspent. 1 = the queue is the estimated budget. With people (``oracle.kind`` folder or
    label-studio) the exported queue is always the estimated budget."""


@dataclass(frozen=True)
class CostConfig:
    """The annotation cost model in clicks (``strategies.CostModel``), shared by image-level and
    region-level runs so both are compared on the same axis: a region costs ``clicks_per_region``
    (plus polygons when mixed); a whole image its polygons."""

    clicks_per_region: float = 1.0
    """One region labeled with its dominant class."""
    clicks_per_vertex: float = 1.0
    """One polygon vertex."""
    clicks_per_object: float = 0.0
    """Extra clicks per polygon (e.g. choosing its class from a list)."""
    polygon_tolerance_px: float = 1.0
    """The largest distance, in pixels, of an object's outline from its polygon."""
    purity_threshold: float = 0.9
    """A region whose dominant class covers less than this share of its pixels is drawn in full;
    0 = dominant labeling only (every region costs one click)."""

    def __post_init__(self) -> None:
        from strategies import CostModel

        for f in dataclasses.fields(self):  # CostModel checks each value; name the key that failed
            try:
                CostModel(**{f.name: getattr(self, f.name)})
            except ValueError as exc:
                raise ValueError(f"cost.{f.name}: {exc}") from None


@dataclass(frozen=True)
class ReviewConfig:
    enabled: bool = True
    """Score labeled and validation images too, in the same Ray Data pass as the pool: label-issue
    scores, image quality (brightness, contrast, sharpness) and objects per class, and a per-round
    report of which of them relate to per-image validation IoU."""
    relabel_top_k: int = 0
    """After each round's scoring, send the k labeled samples with the highest label-issue score
    back to the oracle for relabeling (0 = off)."""
    simulate_relabel: bool = False
    """With the ``simulated`` oracle (benchmarks): answer the relabel requests at the end of each
    round's labeling, so later rounds train on the corrected masks. Every labeled sample flagged
    ``needs_relabel`` (the round's relabel queue and ``shoal edit --relabel``) gets the ground-truth
    mask the dataset came with (its ``mask_path`` in the experiment's first table revision) back, in
    one new revision commented ``relabel: ...``. Ignored by the people oracles."""


@dataclass(frozen=True)
class OracleConfig:
    kind: Literal["simulated", "folder", "label-studio"] = "simulated"
    """``simulated`` reveals ground truth at once; ``folder`` and ``label-studio`` export a task
    folder, pause the round (``awaiting_labels``) and take masks back with ``shoal import-labels``."""
    preannotate: bool = True
    """Write the round model's predicted masks into the task folder as pre-annotations."""
    label_map: dict[str, int] | None = None
    """Label Studio label name -> class id (default: the class names in order). Every class needs a
    name; the first name of a class is the one the labeling config and pre-annotations use, others
    are accepted on import."""
    image_root_url: str | None = None
    """A URL under which the work dir is served over HTTP (any static file server): image URLs in
    tasks.json are ``<image_root_url>/<path under the work dir>``. Null: Label Studio serves the
    files itself (``/data/local-files/?d=...``; see ``local_files_root``)."""
    local_files_root: str | None = None
    """The ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` Label Studio runs with (the work dir or a folder
    above it); null = the work dir. Each task folder's README gives the exact steps."""


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None
    """None = a SQLite store in the work dir (``<workdir>/mlflow.db``)."""
    experiment_name: str | None = None
    """None = ``experiment.name``."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    """None = the cluster in ``RAY_ADDRESS`` when set (``ray job submit``), else a new local one."""
    num_cpus: int | None = None
    """CPUs of a new local cluster (None = all)."""
    log_to_driver: bool = False
    """Stream Ray workers' logs to the console (errors reach the driver either way)."""


@dataclass(frozen=True)
class SamPromptConfig:
    """How SAM is prompted from a predicted mask: one prompt per connected component of a class."""

    min_area_px: int = 16
    """Components smaller than this many pixels (at data.image_size) get no prompt."""
    positive_points: int = 1
    """Points inside each component, at the maxima of its (eroded) distance transform; 0 = box only."""
    negative_points: int = 0
    """Points inside the component's box but outside it, farthest from it first."""
    erosion_px: int = 2
    """Erosion radius applied before placing positive points, away from the component's rim."""
    skip_classes: Any = ()
    """Class ids never prompted, e.g. ``[0]`` for a background class."""

    def __post_init__(self) -> None:
        for key in ("min_area_px", "positive_points", "negative_points", "erosion_px"):
            low = 1 if key == "min_area_px" else 0
            if getattr(self, key) < low:
                raise ValueError(f"sam.prompts.{key}: must be >= {low}, got {getattr(self, key)}")
        skip = self.skip_classes
        if not isinstance(skip, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in skip):
            raise ValueError(f"sam.prompts.skip_classes: expected a list of class ids, got {skip!r}")
        object.__setattr__(self, "skip_classes", tuple(skip))


@dataclass(frozen=True)
class SamFinetuneConfig:
    """Per-round fine-tuning of SAM's mask decoder on the labeled masks (encoders frozen, cached
    embeddings, box and point prompts with jitter). The tuned decoder is used for agreement and
    pre-annotations; its held-out mask IoU is recorded with the round's score phase."""

    enabled: bool = False
    steps: int = 200
    """Optimiser steps (one image's prompts per step)."""
    lr: float = 1e-4
    prompts_per_step: int = 16
    box_jitter: float = 0.1
    """Standard deviation of each box side's shift, as a fraction of the box's size."""
    holdout_fraction: float = 0.2
    """Share of the labeled images held out to measure mask IoU (at least one)."""

    def __post_init__(self) -> None:
        for key in ("steps", "prompts_per_step", "lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"sam.finetune.{key}: must be positive, got {getattr(self, key)}")
        if self.box_jitter < 0:
            raise ValueError(f"sam.finetune.box_jitter: must not be negative, got {self.box_jitter}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"sam.finetune.holdout_fraction: must be in (0, 1), got {self.holdout_fraction}")


@dataclass(frozen=True)
class SamConfig:
    """Segment Anything: pool scoring by SAM agreement, pre-annotations, an embedding cache.

    A strategy that reads SAM columns (``sam_disagreement``, or a ``fusion`` with it) makes the
    score phase run SAM over the pool; that needs ``enabled``. Actors use the ``score`` section's
    resources (``score.gpus_per_actor``, fractions allowed; 0 = CPU).
    """

    enabled: bool = False
    """Use SAM: required by SAM strategies; with an interactive oracle and ``oracle.preannotate``,
    pre-annotations are SAM-refined masks with the model's class per region."""
    model_type: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "vit_b"
    """The architecture of ``checkpoint`` (``tiny``: a toy SAM for tests and benchmarks)."""
    checkpoint: str | None = None
    """Path to the official weights (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth),
    readable by every Ray node; loaded with ``torch.load(weights_only=True)``."""
    cache_uri: str | None = None
    """Where image embeddings are kept across rounds, keyed by image content and checkpoint: a
    directory or a pyarrow filesystem URI (``s3://...``); null = ``<workdir>/sam_cache``."""
    multimask_output: bool = False
    """Ask for three masks per prompt and keep the one SAM rates best."""
    embed_batch_size: int = 4
    """Images per image-encoder forward pass."""
    prompt_batch_size: int = 64
    """Prompts per mask-decoder call (memory grows with it)."""
    prompts: SamPromptConfig = field(default_factory=SamPromptConfig)
    finetune: SamFinetuneConfig = field(default_factory=SamFinetuneConfig)

    def __post_init__(self) -> None:
        if self.enabled and not self.checkpoint:
            raise ValueError(
                f"sam.checkpoint: required when sam.enabled is true: the path to the official "
                f"{self.model_type} weights (see https://github.com/facebookresearch/segment-anything#model-checkpoints)"
            )
        for key in ("embed_batch_size", "prompt_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"sam.{key}: must be positive, got {getattr(self, key)}")


@dataclass(frozen=True)
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    cost: CostConfig = field(default_factory=CostConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """``{"train.epochs": 8, ...}``: the config as MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value and prefix != "model.options":
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


_POSITIVE = {
    "data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.height",
    "data.synthetic.width", "train.epochs", "train.batch_size", "train.cpus_per_worker",
    "score.num_actors", "score.batch_size", "loop.initial_labeled", "loop.budget", "loop.rounds",
    "train.loss.class_weight_cap", "train.loss.dice_smooth",
}
_NON_NEGATIVE = {
    "train.num_workers", "train.lr", "train.weight_decay", "score.gpus_per_actor", "train.momentum",
    "train.warmup_steps", "train.loss.pixel_weight", "train.loss.dice_weight", "train.loss.focal_gamma",
    "train.loss.ohem_anneal_steps", "train.augment.color_jitter", "train.max_failures",
}


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists to tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}: {value!r} is not {tp}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(map(repr, typing.get_args(tp)))
            raise ValueError(f"{path}: {value!r} is not one of {allowed}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(args):
            raise ValueError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf would slip through every range check
            raise ValueError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config annotation {tp!r}")


def _build(cls: Any, data: Mapping[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ValueError(f"unknown config key '{where}'; valid keys here: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(value, hints[key], sub)
        if sub in _POSITIVE and kwargs[key] <= 0:
            raise ValueError(f"{sub}: must be positive, got {value!r}")
        if sub in _NON_NEGATIVE and kwargs[key] < 0:
            raise ValueError(f"{sub}: must not be negative, got {value!r}")
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    if cfg.data.kind == "folder" and cfg.data.train_dir is None:
        raise ValueError("data.train_dir: required when data.kind is 'folder'")
    if cfg.data.write_back_masks and cfg.oracle.kind == "simulated":
        raise ValueError("data.write_back_masks: only with people labeling (oracle.kind folder or label-studio): the "
                         "simulated oracle's masks are the pool's own")
    if not 0.0 < cfg.data.val_share < 1.0:
        raise ValueError(f"data.val_share: must be in (0, 1): a share of the labeled images held out for "
                         f"validation, the rest trained on; got {cfg.data.val_share}")
    if any(v <= 0 for v in cfg.data.image_size):
        raise ValueError(f"data.image_size: must be two positive integers, got {cfg.data.image_size}")
    if cfg.train.samples_per_epoch is not None and cfg.train.samples_per_epoch <= 0:
        raise ValueError("train.samples_per_epoch: must be positive or null")
    _validate_train(cfg.train)
    from strategies import region_strategy_names, strategy_names

    if cfg.loop.unit == "region":
        _validate_regions(cfg)
    elif cfg.loop.strategy in region_strategy_names():
        raise ValueError(
            f"loop.strategy: '{cfg.loop.strategy}' selects regions; set loop.unit: region, or choose an image "
            f"strategy: {', '.join(strategy_names())}"
        )
    elif cfg.loop.strategy not in strategy_names():
        raise ValueError(
            f"loop.strategy: unknown strategy '{cfg.loop.strategy}'; "
            f"registered: {', '.join(strategy_names())}"
        )


def _validate_regions(cfg: Config) -> None:
    """``loop.unit: region``: a region strategy, a click budget, valid regions (every oracle kind labels
    regions: the simulated one from the truth, people through a region task folder)."""
    from strategies import build_region_strategy, region_strategy_names

    if cfg.loop.strategy not in region_strategy_names():
        raise ValueError(
            f"loop.strategy: '{cfg.loop.strategy}' is not a region strategy; with loop.unit: region choose one of "
            f"{', '.join(region_strategy_names())}"
        )
    try:
        build_region_strategy(cfg.loop.strategy, **cfg.loop.strategy_options)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"loop.strategy_options: {exc}") from None
    budget = cfg.regions.budget_clicks
    if not (math.isfinite(cfg.regions.queue_factor) and cfg.regions.queue_factor >= 1):
        raise ValueError(f"regions.queue_factor: must be a number >= 1, got {cfg.regions.queue_factor}")
    if budget is None or not budget > 0 or budget == float("inf"):
        raise ValueError(f"regions.budget_clicks: required with loop.unit: region, a positive number of clicks "
                         f"per round; got {budget!r}")
    if cfg.review.simulate_relabel:
        raise ValueError("review.simulate_relabel: not supported with loop.unit: region (it would replace partial "
                         "masks with whole ones)")
    initial = cfg.regions.initial_clicks
    if initial is not None and not initial > 0:
        raise ValueError(f"regions.initial_clicks: a positive number of clicks or null, got {initial}")
    if initial is not None and cfg.oracle.kind != "simulated":
        raise ValueError("regions.initial_clicks: a benchmark protocol for the simulated oracle; with people, start "
                         "from seed masks or from the images round 0 asks for")
    if cfg.regions.method == "sam" and not cfg.sam.enabled:
        raise ValueError("regions.method: 'sam' needs sam.enabled: true and sam.checkpoint (SAM's weights)")
    from workers import RegionSpec  # checks every field's range, naming it (regions.<field>)

    fields = {f.name for f in dataclasses.fields(RegionSpec)} - {"image_size"}
    RegionSpec(image_size=cfg.data.image_size, **{k: v for k, v in dataclasses.asdict(cfg.regions).items() if k in fields})


def _validate_train(t: TrainConfig) -> None:
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ValueError(f"train.grad_clip: must be positive or null (no clipping), got {t.grad_clip}")
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        raise ValueError(
            f"train.early_stopping_patience: must be >= 1 or null (never stop early), got {t.early_stopping_patience}"
        )
    loss = t.loss
    if not 0.0 < loss.imbalance_threshold < 1.0:
        raise ValueError(f"train.loss.imbalance_threshold: must be in (0, 1), got {loss.imbalance_threshold}")
    if not 0.0 < loss.ohem_top_k_min <= 1.0:
        raise ValueError(f"train.loss.ohem_top_k_min: must be in (0, 1], got {loss.ohem_top_k_min}")
    pixel = loss.name != "dice"
    dice = loss.name == "dice" or loss.name.endswith("_dice")
    if (not pixel or loss.pixel_weight == 0) and (not dice or loss.dice_weight == 0):
        raise ValueError(f"train.loss: every term of loss '{loss.name}' has weight 0; nothing would be learned")
    aug = t.augment
    low, high = aug.scale_range
    if not 0 < low <= high:
        raise ValueError(f"train.augment.scale_range: expected [low, high] with 0 < low <= high, got {list(aug.scale_range)}")
    if aug.crop is not None and min(aug.crop) < 1:
        raise ValueError(f"train.augment.crop: expected two positive integers or null, got {list(aug.crop)}")
    if aug.color_jitter >= 1:
        raise ValueError(f"train.augment.color_jitter: must be in [0, 1), got {aug.color_jitter}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from a mapping plus ``KEY=VALUE`` overrides (values parsed as YAML)."""
    merged: dict[str, Any] = _to_plain(dict(data))
    for item in overrides:
        keys, value = _parse_override(item)
        node = merged
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    cfg = _build(Config, merged)
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load ``configs/*.yaml`` (``yaml.safe_load``) and apply ``KEY=VALUE`` overrides."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    try:
        return config_from_dict(data, overrides)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
