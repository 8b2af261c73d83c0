# Helpers only: paths, the experiment matrix (from remamber.config, never restated here) and launchers.
import os
import re

from remamber.config import ExperimentConfig

# The CLI re-reads the same params file, so every job sees exactly what Snakemake validated. Snakemake
# lists a --configfile given on the command line before the Snakefile's default (params/demo.yaml), and
# the command line's wins: that is the one. One params file per run (overrides go into a params file);
# the rules read its values from EXP (checked, defaults filled in), never from `config` directly.
CONFIGFILE = os.path.relpath(workflow.configfiles[0])
EXP = ExperimentConfig.from_yaml(CONFIGFILE, check_model=False)
NAME = EXP.name
RESULTS = EXP.results
DATA = EXP.data
RAW = DATA.raw
PROCESSED = DATA.processed
DATASETS = list(DATA.datasets)
# generated, git-ignored; the committed demo outputs are in reports/reference/demo
REPORTS = str(config.get("reports") or "reports").rstrip("/")
LOGS = f"logs/{NAME}"
JOBS = {(j.dataset, j.variant, int(j.resolution)): j for j in EXP.jobs()}
TABLES = list(EXP.tables)
# Real data is checked against the published counts; synthetic data against what its generator wrote.
# A list: the rule quotes each element (`{params.counts:q}`), and an empty list adds nothing.
EXPECTED_COUNTS = ["--expected-counts", "params/datasets.yaml"] if DATA.source == "download" else []


def _one_of(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


# From the matrix: a wildcard matches the configured names only.
wildcard_constraints:
    dataset=_one_of(DATASETS),
    variant=_one_of({j.variant for j in EXP.jobs()}),
    res="[0-9]+",
    split=_one_of({s for d in DATA.datasets.values() for s in d.splits}),
    table=_one_of(TABLES),


def splits(dataset):
    return list(DATA.datasets[dataset].splits)


def model_dir(dataset, variant, res):
    return f"{RESULTS}/models/{dataset}/{variant}/{res}"


# One evaluation job per model scores every split of its dataset (one process start, one model load);
# its file is the list of the splits' records.
def metrics_file(dataset, variant, res):
    return f"{RESULTS}/metrics/{dataset}/{variant}/{res}/metrics.json"


def shuffled_metrics_file(dataset, variant, res):
    """The shuffled-text control of a model (every sentence moved to another image), every split."""
    return f"{RESULTS}/metrics/{dataset}/{variant}/{res}/shuffled.json"


def baseline_file(dataset):
    """The text-blind baselines (largest / centre / random object) on every split of a dataset."""
    return f"{RESULTS}/metrics/{dataset}/baselines.json"


def control_metrics():
    shuffled = [shuffled_metrics_file(j.dataset, j.variant, j.resolution) for j in
                dict.fromkeys(j for j, _ in EXP.shuffled_text_evaluations())]
    blind = [baseline_file(d) for d in dict.fromkeys(d for d, _ in EXP.baseline_splits())]
    return shuffled + blind


def index_meta(dataset):
    return f"{PROCESSED}/{dataset}/meta.json"


def table_spec(table):
    spec = EXP.tables[table]  # the matrix as read by remamber.config (a shared matrix file resolved)
    return spec, spec["resolution"]


def table_metrics(wildcards):
    spec, res = table_spec(wildcards.table)
    files = [metrics_file(ds, v, res) for ds in spec["datasets"] for v in spec["variants"]]
    controls = spec.get("controls", [])
    if "shuffled_text" in controls:
        files += [shuffled_metrics_file(ds, "twister", res) for ds in spec["datasets"]]
    if set(controls) - {"shuffled_text"}:
        files += [baseline_file(ds) for ds in spec["datasets"]]
    return files


def all_metrics():
    return [metrics_file(d, v, r) for (d, v, r) in JOBS] + control_metrics()


def job_of(wildcards):
    key = (wildcards.dataset, wildcards.variant, int(wildcards.res))
    if key not in JOBS:
        raise ValueError(f"{CONFIGFILE}: no table trains {key}; known jobs: {sorted(JOBS)}")
    return JOBS[key]


# Figures come from the low-resolution models of Table 1 on its first dataset (RefCOCO in the paper).
FIG_SPEC, FIG_RES = table_spec("table1")
FIG_DATASET = FIG_SPEC["datasets"][0]
FIG_SPLIT = splits(FIG_DATASET)[0]


def inspect_file(variant):
    return f"{RESULTS}/inspect/{FIG_DATASET}/{variant}/{FIG_RES}/{FIG_SPLIT}.npz"


FIGURES = ["fig4_interaction_vs_attention", "fig5_cube_pca", "fig7_overlays", "training_curves"]


def all_reports():
    tables = [f"{REPORTS}/{t}.{ext}" for t in TABLES for ext in ("tex", "csv")]
    figures = [f"{REPORTS}/figures/{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")]
    return tables + figures + [f"{REPORTS}/metrics.json"]


def launcher(resources):
    """`remamber` for one device; torchrun DDP when a rule is given several GPUs."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m remamber.cli"
    return "remamber"
