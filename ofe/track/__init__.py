"""Mirroring runs to Weights & Biases or MLflow (issue 24; docs/tracking.md): a side channel fed from the
trainer's own metric rows, never part of what a run computes or of its identity.

`names` spells ofe's rows as tracker names (pure functions); `backends` puts the two libraries behind one
small interface, imported only when a run is tracked; `tracker` runs a backend in a background thread fed
by a bounded queue, so a training step never waits on it and a tracker failure is a warning, never a
failed run; `live` is what the trainer and the quantisation step call; `export` mirrors finished runs
afterwards from their Parquet tables. Torch-free.
"""
