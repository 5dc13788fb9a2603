"""Compression (pruning, quantization) and the measurements every variant gets."""

from kdsec.compress.measure import VariantMetrics, measure_variant
from kdsec.compress.prune import global_magnitude_prune, prunable_parameters
from kdsec.compress.structured import structured_prune
from kdsec.compress.quantize import load_int8, load_weights, quantize_dynamic_int8, save_int8, weights_format

__all__ = ["VariantMetrics", "global_magnitude_prune", "load_int8", "load_weights", "measure_variant", "prunable_parameters",
           "quantize_dynamic_int8", "save_int8", "structured_prune", "weights_format"]
