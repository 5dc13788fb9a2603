"""Typed configuration of the whole pipeline.

Every section is a frozen pydantic model that forbids unknown keys, so a typo in YAML or in a
``--set`` override is an error naming the key, never a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from kdsec.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class Section(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class DataConfig(Section):
    name: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | imagefolder
    # As written: ~ and $VARS are expanded when the data is read (kdsec.data.vision.dataset_root),
    # so the config's digest and saved YAML do not depend on the machine or shell that loaded it.
    root: str = "data"
    download: bool = False  # let torchvision download mnist / fashion_mnist / cifar10 into root
    verify_checksums: bool = True  # cifar10: official md5 sums (off for user-made copies in the same format)
    max_samples: Annotated[int, Field(ge=0)] = 0  # stratified subset before splitting (0 = all)
    image_size: PositiveInt = 32  # imagefolder: images resized to this square
    channels: Literal[1, 3] = 3  # imagefolder: grayscale or RGB
    # Input normalization, per channel, after scaling pixels to [0, 1]: none; dataset (mean/std of
    # the training split); given (data.mean / data.std, e.g. the usual CIFAR-10 statistics).
    # Served models apply the same normalization to raw pixels.
    normalize: Literal["none", "dataset", "given"] = "none"
    mean: list[float] = []
    std: list[PositiveFloat] = []
    seed: int = 0
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    holdout_fraction: Fraction = 0.2
    # A separate distillation transfer set (0 = none): neither the teacher nor the audit sees it.
    transfer_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    @model_validator(mode="after")
    def _given_statistics(self) -> DataConfig:
        if self.normalize == "given" and (not self.mean or len(self.mean) != len(self.std)):
            raise ValueError("normalize: given needs data.mean and data.std, one value per channel each")
        return self

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        used = self.val_fraction + self.test_fraction + self.holdout_fraction + self.transfer_fraction
        if used >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction + holdout_fraction + transfer_fraction = {used:.2f} leaves "
                "under 10% for training; lower them"
            )
        return self


class TrainConfig(Section):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    patience: PositiveInt = 5
    grad_clip: Annotated[float, Field(ge=0.0)] = 5.0  # max gradient norm (0 = no clipping)
    augment: Literal["none", "shift", "crop_flip"] = "none"
    # Mixed precision on cuda (bfloat16 autocast, or float16 with loss scaling); CPU always float32.
    mixed_precision: bool = True


class DPConfig(Section):
    """Differentially private training (Opacus DP-SGD) of an extra student on hard labels only:
    teacher soft labels are a function of the private data, so a distilled student would void ε."""

    enabled: bool = False
    target_epsilon: PositiveFloat = 8.0
    delta: Annotated[float, Field(gt=0.0, lt=0.01)] = 1e-5
    max_grad_norm: PositiveFloat = 1.0  # per-sample gradient clipping bound
    epochs: PositiveInt = 60
    batch_size: PositiveInt = 128  # expected Poisson batch size
    lr: PositiveFloat = 0.01


# Architectures. `teacher` and `student` are each one of the classes below, picked by `arch`
# (a pydantic discriminated union): each architecture declares its own options, with its own
# defaults per section, and refuses the options of the others. In YAML the section stays flat:
#   student: {arch: he_mlp, hidden: [32], pool: 1, train: {...}, dp: {...}}


def _scale(value: int, factor: float) -> int:
    """A width × ``factor``, rounded, at least 1 (sweep.width members)."""
    return max(1, round(value * factor))


class ArchOptions(Section):
    """The options of one architecture of kdsec/models: exactly its builder's keyword arguments."""

    arch: str

    def model_options(self) -> dict[str, Any]:
        """The builder's keyword arguments (``ModelSpec.options``): part of checkpoints and cache keys."""
        raise NotImplementedError

    def scaled(self, factor: float) -> Self:
        """A copy with every width × ``factor`` (rounded, at least 1); depth and the rest unchanged."""
        raise NotImplementedError


class CNNOptions(ArchOptions):
    """teacher_cnn (the seed TeacherNet) and student_cnn (its StudentNet): conv-ReLU-max-pool blocks,
    then Linear(fc) → ReLU → Linear. Both take the same options, so one class holds both."""

    arch: Literal["teacher_cnn", "student_cnn"] = "teacher_cnn"
    channels: list[PositiveInt] = [32, 64]  # output channels of each conv block (depth = its length)
    fc: PositiveInt = 128  # width of the hidden fully connected layer

    def model_options(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "fc": self.fc}

    def scaled(self, factor: float) -> Self:
        return self.model_copy(update={"channels": [_scale(c, factor) for c in self.channels],
                                       "fc": _scale(self.fc, factor)})


class ResNetOptions(ArchOptions):
    """resnet18: torchvision's ResNet-18 with a 3×3 stride-1 stem and no max-pool (32×32 inputs)."""

    arch: Literal["resnet18"] = "resnet18"
    width: PositiveInt = 64  # channels of the first stage, doubled per stage (64 = the standard ResNet-18)

    def model_options(self) -> dict[str, Any]:
        return {"width": self.width}

    def scaled(self, factor: float) -> Self:
        return self.model_copy(update={"width": _scale(self.width, factor)})


class HEMLPOptions(ArchOptions):
    """he_mlp, the HE-friendly MLP: [AvgPool(pool) →] Flatten → [Linear → x²] × len(hidden) → Linear."""

    arch: Literal["he_mlp"] = "he_mlp"
    hidden: list[PositiveInt] = [32]  # width of each hidden layer (depth = its length)
    pool: PositiveInt = 1  # average-pool the input first, e.g. 4 for 32×32 images (folded into layer 1 under HE)

    def model_options(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden), **({"pool": self.pool} if self.pool > 1 else {})}

    def scaled(self, factor: float) -> Self:
        return self.model_copy(update={"hidden": [_scale(h, factor) for h in self.hidden]})


class HECNNOptions(ArchOptions):
    """he_cnn, the HE-friendly CNN: [AvgPool(pool) →] [Conv → [BatchNorm] → [AvgPool(conv_pool)] → x²]
    × len(channels) → Flatten → [Linear → x²] × len(hidden) → Linear. The defaults are CryptoNets'
    layout (28×28: 5×13×13 = 845 → 100 → 10); under HE each run of affine layers is one Linear map."""

    arch: Literal["he_cnn"] = "he_cnn"
    channels: Annotated[list[PositiveInt], Field(min_length=1)] = [5]  # output channels of each conv layer
    kernel: PositiveInt = 5
    stride: PositiveInt = 2
    padding: Annotated[int, Field(ge=0)] = 1
    conv_pool: PositiveInt = 1  # average-pool each conv layer's maps (before x²)
    hidden: list[PositiveInt] = [100]  # width of each hidden fully connected layer
    batchnorm: bool = False  # BatchNorm after each conv (folded into the conv's Linear map under HE)
    pool: PositiveInt = 1  # average-pool the input first (done by the client before encryption under HE)

    def model_options(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "kernel": self.kernel, "stride": self.stride,
                "padding": self.padding, "conv_pool": self.conv_pool, "hidden": list(self.hidden),
                "batchnorm": self.batchnorm, "pool": self.pool}

    def scaled(self, factor: float) -> Self:
        return self.model_copy(update={"channels": [_scale(c, factor) for c in self.channels],
                                       "hidden": [_scale(h, factor) for h in self.hidden]})


# The section classes come first in each class's bases so that the YAML reads arch, options, train(, dp).

class TeacherSection(Section):
    """The fields every teacher has, whatever its architecture."""

    train: TrainConfig = TrainConfig(epochs=60, patience=20, lr=3e-3, augment="shift")


class CNNTeacherConfig(TeacherSection, CNNOptions):
    """Teacher defaults: teacher_cnn, channels [32, 64], fc 128 (sized for 8×8 digits); the same for
    a student_cnn teacher."""


class ResNetTeacherConfig(TeacherSection, ResNetOptions):
    """Teacher default: width 64 (the standard ResNet-18)."""


class HEMLPTeacherConfig(TeacherSection, HEMLPOptions):
    """Teacher defaults: hidden [32], pool 1."""


class HECNNTeacherConfig(TeacherSection, HECNNOptions):
    """Teacher defaults: channels [5], kernel 5, stride 2, padding 1, hidden [100] (CryptoNets)."""


class StudentSection(Section):
    """The fields every student has, whatever its architecture."""

    # Batch 32: twice the steps per epoch. Over 8 seeds on digits the KD gain over scratch rose
    # from +0.69 pt (batch 64) to +1.15 pt, the KD student from 0.9757 to 0.9778.
    train: TrainConfig = TrainConfig(epochs=200, batch_size=32, patience=60, lr=3e-3)
    dp: DPConfig = DPConfig()


class CNNStudentConfig(StudentSection, CNNOptions):
    """Student defaults (half the teacher's): channels [16, 32], fc 64, for student_cnn and teacher_cnn."""

    arch: Literal["teacher_cnn", "student_cnn"] = "student_cnn"
    channels: list[PositiveInt] = [16, 32]  # output channels of each conv block: half the teacher default
    fc: PositiveInt = 64  # width of the hidden fully connected layer: half the teacher default


class ResNetStudentConfig(StudentSection, ResNetOptions):
    """Student default: width 32 (half the standard ResNet-18)."""

    width: PositiveInt = 32  # channels of the first stage: half the standard ResNet-18


class HEMLPStudentConfig(StudentSection, HEMLPOptions):
    """Student defaults: hidden [32], pool 1 (he_mlp is the default student: CKKS can run it)."""


class HECNNStudentConfig(StudentSection, HECNNOptions):
    """Student defaults: channels [5], kernel 5, stride 2, padding 1, hidden [100] (CryptoNets)."""


TEACHER_ARCH = "teacher_cnn"  # the default teacher.arch
STUDENT_ARCH = "he_mlp"  # the default student.arch


def _with_default_arch(default: str):
    def fill(value: Any) -> Any:
        return {"arch": default, **value} if isinstance(value, dict) and "arch" not in value else value

    return BeforeValidator(fill)


TeacherConfig = Annotated[CNNTeacherConfig | ResNetTeacherConfig | HEMLPTeacherConfig | HECNNTeacherConfig,
                          Field(discriminator="arch"), _with_default_arch(TEACHER_ARCH)]
StudentConfig = Annotated[CNNStudentConfig | ResNetStudentConfig | HEMLPStudentConfig | HECNNStudentConfig,
                          Field(discriminator="arch"), _with_default_arch(STUDENT_ARCH)]


def _arch_classes(union: Any) -> dict[str, type[ArchOptions]]:
    """arch name → the union member that takes it."""
    members = get_args(get_args(union)[0])
    return {arch: member for member in members for arch in get_args(member.model_fields["arch"].annotation)}


# Per section: every arch it accepts (the same for both) → its class; a test checks them against MODELS.
ARCHES: dict[str, dict[str, type[ArchOptions]]] = {"teacher": _arch_classes(TeacherConfig),
                                                  "student": _arch_classes(StudentConfig)}
_SHARED_FIELDS = {"teacher": {"arch", *TeacherSection.model_fields}, "student": {"arch", *StudentSection.model_fields}}
_DEFAULT_ARCH = {"teacher": TEACHER_ARCH, "student": STUDENT_ARCH}


def arch_option_names(section: str, arch: str) -> list[str]:
    """The options ``arch`` takes in ``section`` (teacher/student), e.g. ['hidden', 'pool'] for he_mlp."""
    return [name for name in ARCHES[section][arch].model_fields if name not in _SHARED_FIELDS[section]]


class DistillConfig(Section):
    loss: str = "hinton_kd"  # hinton_kd | attention (attention transfer) | fitnets (hints)
    temperature: PositiveFloat = 4.0
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    # Feature losses: the weight of the feature term (None = the method's published default) and
    # the tapped modules (names from model.named_modules(), or auto).
    feature_weight: Annotated[float, Field(ge=0.0)] | None = None
    teacher_layer: str = "auto"
    student_layer: str = "auto"
    # What the students are distilled on: the teacher's own training split, or the separate
    # transfer split (data.transfer_fraction > 0), which makes "teacher leakage through the
    # student" a measurement of its own.
    transfer_set: Literal["train", "transfer"] = "train"


class SweepConfig(Section):
    """A grid over distillation settings and student width; every member is one student trained
    from the same stored teacher signals. An empty list keeps the base value; a grid of one
    member is no sweep."""

    temperature: list[PositiveFloat] = []
    alpha: list[Annotated[float, Field(ge=0.0, le=1.0)]] = []
    loss: list[str] = []
    width: list[PositiveFloat] = []  # multipliers of the configured student's widths
    # threads, or a local Dask cluster of max_workers processes; with compute.dask_address set the
    # members run on that cluster whatever this says
    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: Annotated[int, Field(ge=1, le=64)] = 2  # members trained at once (threads or local Dask workers)

    @model_validator(mode="before")
    @classmethod
    def _moved_address(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dask_address" in data:
            raise ValueError("sweep.dask_address moved to compute.dask_address (it now also sends reference "
                             "models and HE chunks to the cluster)")
        return data


def _dask_address_from_env() -> str:
    return os.environ.get("KDSEC_DASK_ADDRESS", "")


class ComputeConfig(Section):
    """Where the costliest work runs. Empty ``dask_address``: on this machine (threads and host
    processes). A scheduler's address (``tcp://host:8786``; default ``KDSEC_DASK_ADDRESS``, which
    the team stack's Prefect worker sets): the audit's reference models, HE batched chunks and
    sweep members run as tasks on that Dask cluster, with the same results given the seeds."""

    dask_address: Annotated[str, Field(pattern=r"^$|^(tcp|tls)://[A-Za-z0-9.\-_\[\]:]+:[0-9]{1,5}$")] = Field(
        default_factory=_dask_address_from_env)
    connect_timeout: Annotated[float, Field(gt=0.0, le=300.0)] = 10.0  # seconds to reach the scheduler and a worker


class CompressConfig(Section):
    sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    # Rounds of (prune → fine-tune) on a cubic schedule up to `sparsity`; finetune_epochs are shared out.
    prune_steps: Annotated[int, Field(ge=1, le=20)] = 3
    # Structured pruning: this share of hidden neurons / conv channels removed, layers rebuilt smaller
    # (0 = off); fine-tuned like the magnitude-pruned variant.
    structured: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    finetune_epochs: Annotated[int, Field(ge=0)] = 20
    # The structurally pruned student lost capacity, not just weights: it fine-tunes longer
    # (student_cnn [32, 64] on digits, 2 seeds: accuracy change −0.56 pt after 20 epochs, +0.14 after 60).
    structured_finetune_epochs: Annotated[int, Field(ge=0)] = 60
    quantize: bool = True
    # Static post-training int8 (torchao PT2E, calibrated) for students with conv layers; not with
    # encrypt.he.enabled (its graph has no homomorphic form, so an he_cnn candidate never is one).
    static_int8: bool = True
    calibration_samples: PositiveInt = 256  # from the training split
    latency_repeats: PositiveInt = 30
    selection: Literal["smallest_passing", "most_accurate"] = "smallest_passing"


class HEConfig(Section):
    # Homomorphic inference of the candidate. It needs an HE-friendly student (he_mlp, he_cnn: affine
    # layers and x²); with a conv student (ReLU, max-pool) turn it off: the he gate is then skipped.
    enabled: bool = True
    # "auto": the smallest ring that holds the layout's depth at 128-bit security.
    poly_modulus_degree: Literal["auto", 4096, 8192, 16384, 32768] = "auto"
    scale_bits: Annotated[int, Field(ge=20, le=50)] = 30  # precision of every rescaled value
    integer_bits: Annotated[int, Field(ge=4, le=30)] = 14  # headroom: |values| < 2^integer_bits
    # The batched path's chain for students that alternate Linear and x² (he_cnn, he_mlp): "paired"
    # rescales once per x² (60-bit primes, weights at 2^weight_scale_bits, inputs at 2^(60 − 2·that)):
    # fewer primes per ciphertext than "classic" (one rescale per Linear and per x², primes of
    # scale_bits); the Linear layers run as float64 matrix products over the ciphertexts' residues.
    batched_chain: Literal["paired", "classic"] = "paired"
    weight_scale_bits: Annotated[int, Field(ge=12, le=19)] = 15
    modes: Annotated[list[Literal["encrypted_input", "encrypted_model"]], Field(min_length=1)] = [
        "encrypted_input", "encrypted_model"]
    max_samples: Annotated[int, Field(ge=0)] = 0  # 0 = the whole test split
    latency_samples: Annotated[int, Field(ge=0)] = 16  # single-sample path runs timed (0 = skip)
    # Host processes evaluating batched ciphertext chunks at once (SEAL holds the GIL: threads do
    # not help); 0 = one per CPU core, at most one per chunk. 1 = everything in this process.
    host_workers: Annotated[int, Field(ge=0, le=64)] = 0
    # Encrypted-model mode packs few samples per ciphertext for wide students (the presets'
    # 784 → 845 → 10 he_cnn: 8, 72 ms/sample): past this many seconds it stops after the current
    # chunk and reports the samples it ran (logged; the run's `samples` says how many).
    max_mode_seconds: Annotated[float, Field(gt=0)] = 600.0
    log_packages: bool = True  # log host packages (public contexts, encrypted weights ~35 MB) to MLflow


class EncryptConfig(Section):
    key_env: str = "KDSEC_MODEL_KEY"  # the key-encryption key (KEK); wins over key_file
    key_file: str = ".kdsec/keys/model.key"
    signing_key_env: str = "KDSEC_SIGNING_KEY"  # ECDSA P-256 key (PEM) that signs manifests and model.sig
    signing_key_file: str = ".kdsec/keys/signing.pem"
    he: HEConfig = HEConfig()


class AuditConfig(Section):
    low_fpr: Fraction = 0.01
    reference_models: Annotated[int, Field(ge=0, le=64)] = 8  # K for RMIA/LiRA; 0 = LOSS attack only
    # At most this many of the K for the teacher's own group (None: all K). The teacher never ships
    # and no gate reads its audit; its references are the audit's costliest models (conv nets).
    teacher_reference_models: Annotated[int, Field(ge=0, le=64)] | None = 4
    parallel_references: Annotated[int, Field(ge=1, le=64)] = 2  # reference-training tasks run at once
    rmia_a: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3  # offline RMIA interpolation (Zarifzadeh et al.)
    rmia_gamma: Annotated[float, Field(gt=0.0)] = 1.0  # likelihood-ratio margin against population samples
    bootstrap: Annotated[int, Field(ge=0, le=5000)] = 200  # resamples for 95% confidence intervals
    fgsm_epsilons: list[Annotated[float, Field(ge=0.0, le=1.0)]] = [0.0, 0.05, 0.1, 0.2]  # on [0, 1] inputs
    extraction_queries: Annotated[int, Field(ge=0)] = 500  # attacker's query budget (0 = skip the attack)
    extraction_source: Literal["population", "noise"] = "population"  # what the attacker queries with
    extraction_decimals: Annotated[int, Field(ge=0, le=6)] = 1  # the "rounded probabilities" defense
    # The one-run DP audit (Steinke et al. 2023) of a run with student.dp.enabled: canaries (test
    # images, wrong labels, each in the training set with probability 1/2) in two audit copies of
    # the student, one with DP-SGD and one without; 0 = off. Capped at the test split's size. m canaries
    # (m/2 guesses) can refute at most ε ≈ ln(m/6): 256 → 3.74; a larger accountant ε is "inconclusive".
    dp_canaries: Annotated[int, Field(ge=0, le=100_000)] = 256


# The Captum methods kdsec.explain.ATTRIBUTIONS registers (a test checks they are the same).
AttributionMethod = Literal["integrated_gradients", "saliency"]


class ExplainConfig(Section):
    """The explanation trust check: Captum attributions of every model on a seeded sample of test
    images, compared with the teacher's (Spearman, top-k overlap) and checked for faithfulness
    (deletion curve against a random order)."""

    enabled: bool = True  # false: no attributions, the explanation gate is skipped
    methods: Annotated[list[AttributionMethod], Field(min_length=1)] = ["integrated_gradients", "saliency"]
    # The method the explanation gate reads: saliency, because Integrated Gradients multiplies by
    # the input, so even a random student's IG maps follow the digit's strokes (benchmarks/explain_seeds.py).
    primary: AttributionMethod = "saliency"
    sample_size: PositiveInt = 100  # test images explained (at most the test split)
    misclassified_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25  # of the sample, misclassified by a student
    top_k_percent: Annotated[float, Field(gt=0.0, le=100.0)] = 20.0  # top-k overlap: of each image's non-black pixels
    deletion_steps: Annotated[int, Field(ge=1, le=1000)] = 16  # points of the deletion curve after the clean one
    ig_steps: Annotated[int, Field(ge=2, le=1024)] = 32  # Integrated Gradients path steps
    bootstrap: Annotated[int, Field(ge=0, le=5000)] = 200  # resamples (of images) for the 95% intervals
    seed: int = 0  # the sample, the random deletion order and the bootstrap

    @field_validator("primary")
    @classmethod
    def _primary_is_computed(cls, primary: str, info: ValidationInfo) -> str:
        methods = info.data.get("methods", [primary])  # absent when methods itself was invalid
        if primary not in methods:
            raise ValueError(f"it is not in explain.methods {list(methods)}; add it there or pick one of them")
        return primary


class GatesConfig(Section):
    min_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    max_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.03
    max_auc: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    max_tpr: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    min_he_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99
    # Encrypted argmax == the shipped model's own prediction (not its lowered program's): catches a
    # lowering bug, and the int8 model's dynamically quantized activations that CKKS runs in float.
    min_he_agreement_with_model: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99
    # Warn levels: past them the gate still passes but the report and the version tags say "warn".
    warn_auc: Annotated[float, Field(ge=0.0, le=1.0)] = 0.55
    warn_tpr: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    # Extraction (fidelity of a knockoff copy of the served top-1 interface) and calibration gates,
    # set from benchmarks/gate_defaults.py (digits, 5 seeds): the default candidate's fidelity is
    # 0.919–0.967 and its ECE 0.022–0.023; a constant-answer model is copied at fidelity 1.000,
    # over-confident students (overfit, logits × 10) have ECE 0.17–0.24 and the KD student with
    # logits ÷ 3 or ÷ 10 has 0.22 or 0.68. Top-1 fidelity on a learnable task stays high for any
    # accurate model, so this gate fails only copies that are essentially perfect.
    max_extraction_fidelity: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99
    warn_extraction_fidelity: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    max_ece: Annotated[float, Field(ge=0.0, le=1.0)] = 0.10
    warn_ece: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    # Explanation gate: the candidate's mean Spearman agreement with the teacher's attributions
    # (explain.primary, saliency), set from benchmarks/explain_seeds.py (digits, 5 seeds, 100 images):
    # the default candidate scores 0.128-0.237 (lowest 95% bound 0.087); students unrelated to the
    # teacher, explained as a run's candidate, score at most 0.018 (random initialisation, highest
    # bound 0.055) and -0.001 (trained on shuffled labels). 0.07 is the middle of that gap; warn
    # below 0.10. A scratch student scores 0.046-0.107: it agrees less than a distilled one.
    min_explanation_spearman: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.07
    warn_explanation_spearman: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.10

    @model_validator(mode="after")
    def _warn_before_fail(self):
        for warn, fail in (("warn_auc", "max_auc"), ("warn_tpr", "max_tpr"),
                           ("warn_extraction_fidelity", "max_extraction_fidelity"), ("warn_ece", "max_ece")):
            if getattr(self, warn) > getattr(self, fail):
                raise ValueError(f"gates.{warn} ({getattr(self, warn)}) must not exceed gates.{fail} "
                                 f"({getattr(self, fail)})")
        if self.warn_explanation_spearman < self.min_explanation_spearman:
            raise ValueError(f"gates.warn_explanation_spearman ({self.warn_explanation_spearman}) must not be "
                             f"below gates.min_explanation_spearman ({self.min_explanation_spearman})")
        return self


class TrackingConfig(Section):
    experiment: str = "kdsec"
    registered_model: str = "kdsec-student"
    alias: str = "champion"
    output_dir: str = "outputs"
    cache_dir: str = ".kdsec/cache"
    # With approval required, a version that passes every gate gets `candidate_alias` and waits for
    # `kdsec review approve`, which moves `alias` (champion) to it.
    require_approval: bool = False
    candidate_alias: str = "candidate"
    # Four-eyes: an authenticated reviewer may not approve a version whose run they launched
    # (the team stack's MLflow server enforces the same rule itself).
    four_eyes: bool = True


class PipelineConfig(Section):
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = CNNTeacherConfig()
    student: StudentConfig = HEMLPStudentConfig()
    distill: DistillConfig = DistillConfig()
    sweep: SweepConfig = SweepConfig()
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    compress: CompressConfig = CompressConfig()
    encrypt: EncryptConfig = EncryptConfig()
    audit: AuditConfig = AuditConfig()
    explain: ExplainConfig = ExplainConfig()
    gates: GatesConfig = GatesConfig()
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _transfer_split_exists(self) -> PipelineConfig:
        if self.distill.transfer_set == "transfer" and self.data.transfer_fraction == 0:
            raise ValueError("distill.transfer_set is 'transfer' but data.transfer_fraction is 0; "
                             "set data.transfer_fraction (e.g. 0.25)")
        return self

    def digest(self) -> str:
        """A short, stable hash of the resolved config."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _not_an_option(section: str, key: str, arch: str, where: str = "") -> str:
    options = ", ".join(arch_option_names(section, arch))
    return (f"config key '{section}.{key}' is not an option of {section}.arch '{arch}'{where} "
            f"(its options: {options}; see configs/default.yaml)")


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = list(first["loc"])
    arch = None
    if len(loc) >= 2 and loc[0] in ARCHES:
        arch = loc.pop(1)  # the union member's tag (the arch), not part of the key a user writes
    key = ".".join(str(part) for part in loc) or "<root>"
    if first["type"] == "union_tag_invalid" and loc and loc[0] in ARCHES:
        known = ", ".join(sorted(ARCHES[loc[0]]))
        return f"unknown model architecture '{first['ctx']['tag']}' in {key}.arch (known: {known})"
    if first["type"] == "extra_forbidden":
        if arch is not None and len(loc) == 2:
            return _not_an_option(loc[0], loc[1], arch)
        return f"unknown config key '{key}' (check the spelling; see configs/default.yaml)"
    message = first["msg"].removeprefix("Value error, ")
    return f"config key '{key}': {message} (got {first.get('input')!r})"


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like dotted.key=value")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _drop_options_of_replaced_arch(tree: dict[str, Any], written: dict[str, dict[str, Any]],
                                   overrides: list[str] | tuple[str, ...], config_path: Path) -> None:
    """Where ``--set <section>.arch=`` replaced the file's arch, drop the file's options of that arch."""
    assigned = [assignment.split("=", 1)[0].strip().split(".") for assignment in overrides]
    for section, file_section in written.items():
        if [section] in assigned:  # the whole section was given on the command line
            continue
        given = {parts[1] for parts in assigned if len(parts) > 1 and parts[0] == section}
        file_arch = file_section.get("arch", _DEFAULT_ARCH[section])
        node = tree.get(section)
        if ("arch" not in given or not isinstance(node, dict) or node.get("arch") == file_arch
                or not isinstance(file_arch, str) or file_arch not in ARCHES[section]):
            continue
        own_options = arch_option_names(section, file_arch)
        new_arch = node.get("arch")
        # Archs of one options class (teacher_cnn ↔ student_cnn) keep the file's values; an option
        # name two classes share (he_mlp's and he_cnn's hidden) takes the new arch's default.
        same_options = isinstance(new_arch, str) and ARCHES[section].get(new_arch) is ARCHES[section][file_arch]
        for key in file_section:
            if key in _SHARED_FIELDS[section] or key in given:
                continue
            if key not in own_options:
                raise ConfigError(_not_an_option(section, key, file_arch, f" in '{config_path}'"))
            if not same_options:
                del node[key]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML config (safe loader), apply ``dotted.key=value`` overrides, validate.

    ``teacher`` and ``student`` take the options of their ``arch`` only (see ``ARCHES``). When an
    override changes a section's arch (``--set student.arch=student_cnn``), the options the file
    gives for its own arch (``hidden``, ``pool`` for he_mlp) are dropped: they belong to another
    architecture. The new arch gets its defaults for that section unless they are overridden too
    (``--set student.channels=[8,16]``). Any other option that is not the final arch's, given in
    the file or by ``--set``, is an error naming it and the arch.
    """
    config_path = Path(path) if path is not None else DEFAULT_CONFIG
    tree = _read_tree(config_path)
    written = {section: dict(tree[section]) for section in ARCHES if isinstance(tree.get(section), dict)}
    for assignment in overrides:
        _apply_override(tree, assignment)
    _drop_options_of_replaced_arch(tree, written, overrides, config_path)
    return config_from_dict(tree)


def _read_tree(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        raise ConfigError(f"config file '{config_path}' not found (pass --config PATH to an existing YAML file)")
    try:
        tree = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{config_path}' is not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{config_path}' must hold a mapping of sections, not {type(tree).__name__}")
    return tree


def load_run_config(path: str | Path) -> PipelineConfig:
    """The ``config.yaml`` a pipeline run saved, as ``kdsec audit`` re-reads it: also one saved
    before per-architecture options, which held every architecture's options in ``teacher`` and
    ``student``; the options that are not the section's arch are dropped (they never applied)."""
    tree = _read_tree(Path(path))
    for section in ARCHES:
        node = tree.get(section)
        if isinstance(node, dict) and node.get("arch", _DEFAULT_ARCH[section]) in ARCHES[section]:
            options = arch_option_names(section, node.get("arch", _DEFAULT_ARCH[section]))
            tree[section] = {key: value for key, value in node.items()
                             if key in _SHARED_FIELDS[section] or key in options}
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> PipelineConfig:
    """Validate a plain mapping (e.g. parsed JSON from a Prefect parameter) into a config."""
    try:
        return PipelineConfig.model_validate(json.loads(json.dumps(tree)))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
