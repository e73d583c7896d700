"""The two Flower apps pyproject.toml names for ``flwr run .``: entry points, like the scripts in sims/.

May import every other room.
"""
