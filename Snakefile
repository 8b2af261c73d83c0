# ReMamber reproduction: the one DAG from raw data to Tables 1-4 and the figures.
#   snakemake --cores all                                   # embedded default: params/demo.yaml, CPU, minutes
#   snakemake --cores all --use-conda --profile workflow/profiles/gpu reports/table2.tex   # the paper
# Every rule calls the `remamber` CLI; the experiment matrix lives in params/*.yaml only.
# The params file is checked by remamber.config (workflow/rules/common.smk reads it), the one validator
# of params files; workflow/schemas/config.schema.yaml is generated from it for editors and other tools.
# `--config reports=DIR` (a workflow option, not a parameter) puts the rendered reports in DIR instead of
# reports/ (the DVC pipeline of the paper, dvc/paper/dvc.yaml, writes reports/paper).
from snakemake.utils import min_version

min_version("9.0")


configfile: "params/demo.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        all_reports(),
