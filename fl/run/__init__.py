"""What every run shares: its config and command line, run folders and checkpoints, atomic files,
clean interruption, phase timing, versions and the process environment.

May import fl.data and fl.modeling (the config builds their settings); never Flower.
"""
