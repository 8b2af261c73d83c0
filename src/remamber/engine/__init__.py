"""Training, evaluation, prediction, metrics and checkpoints.

Import from the submodules (`remamber.engine.train.train`, `remamber.engine.evaluate.evaluate`,
`remamber.engine.predict.predict`, `remamber.engine.checkpoint.load_model`,
`remamber.engine.metrics.segmentation_metrics`); this package imports nothing itself, so the light modules
(metrics) do not pull in torch models.
"""
