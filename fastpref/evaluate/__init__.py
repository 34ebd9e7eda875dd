"""``fastpref eval``: did preference tuning help? Images of a prompt set from the base pipeline
and trained outputs with the same seeds, scored by the reward models papers report
(:mod:`fastpref.scorers`), compared by paired statistics
(:mod:`fastpref.evaluate.statistics`). A room above :mod:`fastpref.train`: it may import the
trainer and the public API; nothing in train, loss or demo imports it."""
