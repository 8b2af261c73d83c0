"""The ReMamber paper's own numbers (ECCV 2024, Tables 1-4), transcribed row by row in the paper's
order so that each tuple can be read against the printed table.

Values are percentages. Metric names follow the evaluation records: ``mIoU``, ``oIoU``,
``prec@50`` .. ``prec@90``. Table 2's literature rows keep the paper's printed precision (some
cells have one or two decimals), so they are stored as the printed strings; ``None`` is "-".
"""

from __future__ import annotations

from typing import Final

UNC_SPLITS: Final = ("val", "testA", "testB")
UMD_SPLITS: Final = ("val", "test")
UNC_METRICS: Final = ("mIoU", "oIoU", "prec@50", "prec@70")
UMD_METRICS: Final = ("mIoU", "oIoU", "prec@50", "prec@60", "prec@70", "prec@90")

# Table 1 column layout per dataset block: (splits, metrics per split), read left to right.
TABLE1_LAYOUT: Final = {
    "refcoco": (UNC_SPLITS, UNC_METRICS),
    "refcoco+": (UNC_SPLITS, UNC_METRICS),
    "refcocog": (UMD_SPLITS, UMD_METRICS),
}

_TABLE1_ROWS: Final = {
    "refcoco": {
        "attention": (65.3, 62.3, 75.1, 60.6, 67.5, 64.4, 79.1, 65.4, 61.7, 58.0, 69.6, 53.4),
        "in_context": (69.1, 65.9, 79.7, 67.5, 71.2, 68.9, 82.2, 71.8, 66.2, 62.8, 75.0, 61.7),
        "norm_adaptation": (70.2, 67.0, 80.7, 69.6, 72.3, 70.2, 83.1, 73.2, 66.8, 62.8, 75.1, 63.1),
        "twister": (71.6, 68.4, 82.1, 70.9, 73.3, 71.5, 84.8, 74.5, 68.4, 64.5, 77.1, 64.9),
    },
    "refcoco+": {
        "attention": (54.0, 49.7, 60.7, 45.5, 58.7, 55.8, 68.5, 52.9, 46.9, 41.9, 50.6, 36.6),
        "in_context": (58.4, 54.0, 66.3, 53.9, 63.2, 59.4, 72.2, 60.5, 51.5, 47.5, 56.4, 44.5),
        "norm_adaptation": (60.3, 55.2, 68.2, 57.3, 64.2, 59.9, 73.4, 62.9, 53.9, 48.7, 59.0, 47.2),
        "twister": (61.6, 57.3, 70.0, 58.5, 65.8, 62.1, 75.5, 64.9, 54.0, 49.9, 59.4, 47.8),
    },
    "refcocog": {
        "attention": (50.5, 49.2, 54.2, 46.0, 36.7, 8.1, 50.8, 50.8, 57.3, 49.8, 38.6, 6.4),
        "in_context": (54.8, 53.4, 59.5, 52.3, 43.4, 13.3, 55.5, 54.8, 60.7, 53.6, 45.3, 13.3),
        "norm_adaptation": (59.3, 56.7, 66.7, 61.0, 53.7, 18.5, 58.6, 56.6, 65.5, 59.8, 52.8, 18.2),
        "twister": (61.1, 58.0, 68.4, 62.8, 55.2, 18.4, 61.2, 59.0, 69.0, 63.4, 55.5, 18.7),
    },
}

# Table 3 (RefCOCO, 256): rows channel only, spatial only, parallel, spatial-channel, channel-spatial.
_TABLE3_ROWS: Final = {
    "channel_only": (62.3, 60.1, 70.7, 57.2, 64.9, 63.2, 74.3, 61.9, 59.7, 57.5, 66.3, 51.9),
    "spatial_only": (70.0, 65.8, 80.5, 69.1, 72.3, 71.0, 83.7, 73.4, 67.5, 63.5, 75.2, 62.7),
    "parallel": (71.0, 68.8, 81.9, 70.0, 73.1, 71.8, 84.7, 74.1, 67.9, 64.6, 76.9, 64.5),
    "spatial_channel": (71.4, 68.8, 82.4, 70.8, 73.3, 71.4, 84.9, 74.2, 67.9, 64.7, 76.5, 64.4),
    "twister": (71.6, 68.4, 82.1, 70.9, 73.3, 71.5, 84.8, 74.5, 68.4, 64.5, 77.1, 64.9),
}

# Table 4 (RefCOCO, 256): image+global, image+local, image+global+local.
_TABLE4_ROWS: Final = {
    "global_only": (69.1, 66.6, 79.5, 66.3, 71.4, 69.8, 82.3, 70.9, 66.3, 63.7, 74.7, 61.0),
    "local_only": (69.9, 67.9, 80.6, 68.2, 72.2, 70.6, 83.9, 73.1, 66.4, 63.8, 75.3, 61.7),
    "twister": (71.6, 68.4, 82.1, 70.9, 73.3, 71.5, 84.8, 74.5, 68.4, 64.5, 77.1, 64.9),
}

# Table 2 (oIoU at 480): columns in the paper's order.
TABLE2_COLUMNS: Final = (
    ("refcoco", "val"), ("refcoco", "testA"), ("refcoco", "testB"),
    ("refcoco+", "val"), ("refcoco+", "testA"), ("refcoco+", "testB"),
    ("refcocog", "val"), ("refcocog", "test"),
)
# (method, backbone, eight oIoU cells as printed; None for "-")
TABLE2_LITERATURE: Final = (
    ("PCAN [1]", "ResNet-50", ("69.51", "71.64", "64.18", "58.25", "63.68", "48.89", "59.98", "60.8")),
    ("MAttNet [55]", "MaskRCNN ResNet-101", ("56.51", "62.37", "51.7", "46.67", "52.39", "40.08", "47.64", "48.61")),
    ("RMI [29]", "DeepLab ResNet-101", ("45.18", "45.69", "45.57", "29.86", "30.48", "29.50", None, None)),
    ("RRN [25]", "DeepLab ResNet-101", ("55.33", "57.26", "53.95", "39.75", "42.15", "36.11", None, None)),
    ("CMSA [54]", "DeepLab ResNet-101", ("58.32", "60.61", "55.09", "43.76", "47.6", "37.89", None, None)),
    ("CAC [3]", "DeepLab ResNet-101", ("58.90", "61.77", "53.81", None, None, None, "46.37", "46.95")),
    ("STEP [2]", "DeepLab ResNet-101", ("60.04", "63.46", "57.97", "48.19", "52.33", "40.41", None, None)),
    ("BRINet [16]", "DeepLab ResNet-101", ("60.98", "62.99", "59.21", "48.17", "52.32", "42.11", None, None)),
    ("CMPC [17]", "DeepLab ResNet-101", ("61.36", "64.53", "59.64", "49.56", "53.44", "43.23", None, None)),
    ("LSCM [18]", "DeepLab ResNet-101", ("61.47", "64.99", "59.55", "49.34", "53.12", "43.50", None, None)),
    ("CMPC+ [32]", "DeepLab ResNet-101", ("62.47", "65.08", "60.82", "50.25", "54.04", "43.47", None, None)),
    ("BUSNet [52]", "DeepLab ResNet-101", ("63.27", "66.41", "61.39", "51.76", "56.87", "44.13", None, None)),
    ("CGAN [34]", "DeepLab ResNet-101", ("64.86", "68.04", "62.07", "51.03", "55.51", "44.06", "51.01", "51.69")),
    ("EFN [6]", "Wide ResNet-101", ("62.76", "65.69", "59.67", "51.50", "55.24", "43.01", None, None)),
    ("ETRIS [51]", "CLIP ResNet-101", ("71.06", "74.11", "66.66", "62.23", "68.51", "52.79", "60.28", "60.42")),
    ("ReSTR [24]", "ViT-B-16", ("67.22", "69.3", "64.45", "55.78", "60.44", "48.27", "54.48", None)),
    ("ETRIS [51]", "ViT-B-16", ("70.51", "73.51", "66.63", "60.10", "66.89", "50.17", "59.82", "59.91")),
    ("CRIS [49]", "CLIP ResNet-50", ("69.52", "72.72", "64.7", "61.39", "67.1", "52.48", "59.87", "60.36")),
    ("CRIS [49]", "CLIP ResNet-101", ("70.47", "73.18", "66.10", "62.27", "68.08", "53.68", "59.87", "60.36")),
    ("LAVT [53]", "Swin-B", ("72.73", "75.82", "68.79", "62.14", "68.38", "55.10", "61.24", "62.10")),
)
TABLE2_REMAMBER: Final = (
    "ReMamber", "Mamba-B", ("74.54", "76.74", "70.89", "65.00", "70.78", "57.53", "63.9", "64.0"),
)

Cells = dict[str, dict[str, float]]  # split -> metric -> value


def _cells(values: tuple[float, ...], splits: tuple[str, ...], metrics: tuple[str, ...]) -> Cells:
    if len(values) != len(splits) * len(metrics):
        raise AssertionError("transcription row has the wrong number of cells")
    it = iter(values)
    return {split: {metric: next(it) for metric in metrics} for split in splits}


def fusion_numbers(table: str, dataset: str, variant: str) -> Cells | None:
    """Paper cells of Table 1, 3 or 4 for one (dataset, variant), or None if the paper has none.

    Tables 3 and 4 are RefCOCO only; their full-model row is the same run as Table 1's twister.
    """
    if table == "table1":
        row = _TABLE1_ROWS.get(dataset, {}).get(variant)
    elif table in ("table3", "table4") and dataset == "refcoco":
        row = (_TABLE3_ROWS if table == "table3" else _TABLE4_ROWS).get(variant)
    else:
        row = None
    if row is None:
        return None
    splits, metrics = TABLE1_LAYOUT[dataset]
    return _cells(row, splits, metrics)


def remamber_oiou(dataset: str, split: str) -> str | None:
    """The paper's Table 2 ReMamber oIoU cell as printed."""
    return TABLE2_REMAMBER[2][TABLE2_COLUMNS.index((dataset, split))] if (dataset, split) in TABLE2_COLUMNS else None
