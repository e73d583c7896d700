"""Labelled text per domain: embedded sources, user files and their checks, splits, partitions, batches.

May import nothing else from fl/ (it is the floor every other room stands on); tokenisers arrive as arguments.
"""
