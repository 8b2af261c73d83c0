# One training job per (dataset, variant, resolution) of the matrix; a model shared by several tables is
# trained once. last.pt is not a declared output, so Snakemake never deletes it and a killed job resumes.


rule train:
    input:
        index=index_meta("{dataset}"),
        config=CONFIGFILE,
    output:
        best=f"{RESULTS}/models/{{dataset}}/{{variant}}/{{res}}/best.pt",
        history=f"{RESULTS}/models/{{dataset}}/{{variant}}/{{res}}/history.json",
    params:
        out=lambda wc: model_dir(wc.dataset, wc.variant, wc.res),
        experiment=lambda wc: job_of(wc).experiment,
        tables=lambda wc: ",".join(job_of(wc).tables),
        launch=lambda wc, resources: launcher(resources),
    threads: 1  # tiny CPU models scale better as parallel jobs; GPU profiles set more
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/remamber-cuda.yaml"
    log:
        f"{LOGS}/train/{{dataset}}/{{variant}}/{{res}}.log",
    shell:
        "{params.launch} --threads {threads} train --config {input.config:q} --dataset {wildcards.dataset:q}"
        " --variant {wildcards.variant:q} --resolution {wildcards.res:q} --out {params.out:q}"
        " --experiment {params.experiment:q} --tables {params.tables:q} --resume > {log:q} 2>&1"


rule models_all:
    input:
        [f"{model_dir(d, v, r)}/best.pt" for (d, v, r) in JOBS],
