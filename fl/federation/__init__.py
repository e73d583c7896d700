"""The Flower federation: the client, the rounds a strategy runs on a Grid, the simulation, its memory
pre-flight and the permuted starts.

May import fl.data, fl.modeling and fl.run; the merge rules come from strategies/.
"""
