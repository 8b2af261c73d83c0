"""ReMamber: referring image segmentation with Mamba Twister fusion, reproducible end to end.

Layers (imports point one way only):
    ops      -> selective scan and cross-scan primitives (CPU kernel, PyTorch reference, CUDA dispatch)
    models   -> VMamba backbone, text encoders, Twisting layer and the other fusion variants, decoder, loss
    data     -> fetch/verify, refer reader, preprocessing, datasets, synthetic referring dataset
    engine   -> training, evaluation, metrics, prediction (uses models and data)
    tracking -> MLflow conventions
    reports  -> LaTeX tables and figures, from evaluation outputs only
    cli      -> the one `remamber` command that wires them together
"""

__version__ = "0.1.0"
