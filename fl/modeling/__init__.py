"""The multi-head encoder and what is done to it: training, evaluation, client statistics, probes,
distillation, the model-folder format and the simulated attacks on weights and labels.

May import fl.data only; nothing here knows about Flower, run folders or command lines.
"""
