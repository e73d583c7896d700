"""Whole studies that write results: the headline experiment and its baselines, repair, the federated-only
run, the loss barrier, the own-experts study and the reports.

May import every room but fl.apps.
"""
