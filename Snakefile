# ReMamber reproduction: the one DAG from raw data to Tables 1-4 and the figures.
#   snakemake --cores all                                   # embedded default: params/demo.yaml, CPU, minutes
#   snakemake --cores all --use-conda --profile workflow/profiles/gpu reports/table2.tex   # the paper
# Every rule calls the `remamber` CLI; the experiment matrix lives in params/*.yaml only.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params/demo.yaml"


validate(config, schema="workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        all_reports(),
