"""The names of the models a pipeline run trains, compresses and audits: one place builds them.

``teacher``, ``scratch_student`` (labels only), ``kd_student`` (distilled), ``dp_student``
(DP-SGD), ``variant:<name>`` (a compressed copy of the KD student), ``sweep:<name>`` (a member
of a distillation sweep) and ``candidate`` (the variant selected to ship).
"""

from __future__ import annotations

TEACHER = "teacher"
SCRATCH_STUDENT = "scratch_student"
KD_STUDENT = "kd_student"
DP_STUDENT = "dp_student"
CANDIDATE = "candidate"
DENSE = "dense"  # the variant name of the uncompressed KD student
STUDENTS = "student"  # the reference-model group of every student-architecture model (audit)

_VARIANT = "variant:"
_SWEEP = "sweep:"


def variant_role(name: str) -> str:
    """The audited role of a compressed variant; the dense variant is the KD student itself."""
    return KD_STUDENT if name == DENSE else f"{_VARIANT}{name}"


def sweep_member(name: str) -> str:
    return f"{_SWEEP}{name}"


def is_variant(role: str) -> bool:
    return role.startswith(_VARIANT)


def variant_source(role: str) -> str | None:
    """The role an int8 variant was quantized from (``variant:pruned50_int8`` → ``variant:pruned50``,
    ``variant:int8`` → ``kd_student``); None for a role that is not an int8 variant."""
    if not role.endswith("int8"):
        return None
    source = role.removeprefix(_VARIANT).removesuffix("int8").rstrip("_").removesuffix("static").rstrip("_")
    return variant_role(source) if source else KD_STUDENT


def is_distilled(role: str) -> bool:
    """Distilled students and their variants learnt on the distillation split."""
    return role in (KD_STUDENT, CANDIDATE) or is_variant(role)


def reference_group(role: str) -> str:
    """Which reference models an audited model is compared with: its own architecture's."""
    return TEACHER if role == TEACHER else STUDENTS
