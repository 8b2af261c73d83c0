"""The paper's vocabulary, written once: model variants, datasets, the controls of the tables.

Ground floor of the package: imports nothing of torch or of the other layers, so `models`, `config`,
`data`, `engine` and `reports` all read their names, choices and display labels from here, and adding a
fusion variant is its module plus one row of `VARIANTS`.

A variant row says what defines the model (fusion, scan order, interaction: the `ModelConfig` fields a
variant sets) and how the paper's tables and our figures name it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "FUSIONS", "SCAN_ORDERS", "INTERACTIONS", "Variant", "VARIANTS", "register_variant", "variant_label",
    "DatasetFacts", "DATASETS", "SPLIT_BYS", "CONTROLS", "SHUFFLED_TEXT", "SHUFFLED_TEXT_VARIANT",
    "BASELINES", "TEXT_MODES",
]

FUSIONS = ("twister", "in_context", "attention", "norm_adaptation")
# Paper Table 3: the order of the two scans of the Twisting layer; Table 4: the text interactions.
SCAN_ORDERS = ("channel_spatial", "spatial_channel", "parallel", "channel_only", "spatial_only")
INTERACTIONS = ("global_local", "global_only", "local_only")


@dataclass(frozen=True)
class Variant:
    """One named model of the tables. `label`: the row name in the tables and the legend in figures."""

    name: str
    fusion: str
    label: str
    scan_order: str = "channel_spatial"
    interaction: str = "global_local"

    @property
    def fields(self) -> dict[str, str]:
        """The ModelConfig fields this variant sets."""
        out = {"fusion": self.fusion}
        if self.scan_order != "channel_spatial":
            out["scan_order"] = self.scan_order
        if self.interaction != "global_local":
            out["interaction"] = self.interaction
        return out


_VARIANTS = {v.name: v for v in (
    # Table 1: the fusion designs of Sec. 3.6 / Fig. 3
    Variant("attention", "attention", "Attention"),
    Variant("in_context", "in_context", "In-Context"),
    Variant("norm_adaptation", "norm_adaptation", "Adaptation"),
    Variant("twister", "twister", "Mamba Twister"),
    # Table 3: scan orders of the Twisting layer
    Variant("channel_only", "twister", "Channel Scan only", scan_order="channel_only"),
    Variant("spatial_only", "twister", "Spatial Scan only", scan_order="spatial_only"),
    Variant("parallel", "twister", "Parallel", scan_order="parallel"),
    Variant("spatial_channel", "twister", "Spatial-Channel", scan_order="spatial_channel"),
    # Table 4: text interactions
    Variant("global_only", "twister", "Image + Global", interaction="global_only"),
    Variant("local_only", "twister", "Image + Local", interaction="local_only"),
)}
VARIANTS = MappingProxyType(_VARIANTS)  # read-only, live: see register_variant


def register_variant(variant: Variant) -> None:
    """Add a row (a plug-in's or a test's variant; the paper's are above). Its fusion must be buildable:
    `remamber.models.registry.register_fusion` for a new one."""
    if variant.name in _VARIANTS:
        raise ValueError(f"variant {variant.name!r} already exists")
    _VARIANTS[variant.name] = variant


def variant_label(name: str) -> str:
    """The display label of a variant (or a control row's model), or the name itself if unknown."""
    return VARIANTS[name].label if name in VARIANTS else name


@dataclass(frozen=True)
class DatasetFacts:
    """A referring dataset: its refer split scheme (the `refs(<split_by>).p` file), the evaluated splits
    in the paper's order, and its display name."""

    name: str
    split_by: str
    splits: tuple[str, ...]
    label: str


DATASETS = MappingProxyType({d.name: d for d in (
    DatasetFacts("refcoco", "unc", ("val", "testA", "testB"), "RefCOCO"),
    DatasetFacts("refcoco+", "unc", ("val", "testA", "testB"), "RefCOCO+"),
    DatasetFacts("refcocog", "umd", ("val", "test"), "G-Ref"),
)})
# The refer project's split schemes (G-Ref also has Google's, without a test split).
SPLIT_BYS = ("unc", "umd", "google")

# Evaluation-only rows of a table that show how much the models use the text: the twister with every
# sentence moved to a sample of another image, and text-blind guesses (one object of the image, picked
# without the sentence). A metrics record's "text" says which: matched, shuffled, or none (a baseline).
SHUFFLED_TEXT = "shuffled_text"
SHUFFLED_TEXT_VARIANT = "twister"
BASELINES = MappingProxyType({
    "largest_object": "Largest object (no text)",
    "centre_object": "Object nearest the centre (no text)",
    "random_object": "Random object (no text)",
})
CONTROLS = (SHUFFLED_TEXT, *BASELINES)
TEXT_MODES = ("matched", "shuffled", "none")
