"""Experts a user brings: loading them, the compatibility report, one vocabulary, weight merges, ONNX
conversion.

May import fl.data and fl.modeling only: it works without Flower and without a run folder.
"""
