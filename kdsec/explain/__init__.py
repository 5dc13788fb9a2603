"""Explanations as a trust check: Captum attributions of the teacher and every student, agreement
with the teacher and faithfulness (see ``kdsec.explain.run``)."""

from kdsec.explain.attribution import ATTRIBUTIONS, attribution_maps
from kdsec.explain.run import ExplainResult, MethodScores, ModelExplanation, explain_models

__all__ = ["ATTRIBUTIONS", "ExplainResult", "MethodScores", "ModelExplanation", "attribution_maps",
           "explain_models"]
