"""The training lab: tiny transformers trained on a synthetic language, to see what makes sinks form.

:mod:`.language` generates the data, :mod:`.train` trains and measures one model
(:func:`~.train.train_run`), :mod:`.grid` runs a grid over context length × depth × packing × seed,
:mod:`.results` holds what they record. Model code lives in :mod:`lens_squash.edge.lab_models`.
"""
