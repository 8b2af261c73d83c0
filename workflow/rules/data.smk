# Data: synthesise (demo) or fetch + verify + extract (real), then one parquet index per dataset.

if DATA.source == "synthetic":

    rule synth:
        output:
            f"{RAW}/MANIFEST.json",
        params:
            seed=DATA.synth_seed,
            size=DATA.synth_size or "demo",
        conda:
            "../envs/remamber.yaml"
        log:
            f"{LOGS}/synth.log",
        shell:
            "remamber synth --out {RAW:q} --seed {params.seed:q} --size {params.size:q} > {log:q} 2>&1"

    def raw_inputs(wildcards):
        return [f"{RAW}/MANIFEST.json"]

else:

    rule fetch:
        output:
            f"{RAW}/archives/{{archive}}.zip",
        conda:
            "../envs/remamber.yaml"
        params:
            dest=f"{RAW}/archives",
        log:
            f"{LOGS}/fetch/{{archive}}.log",
        retries: 2
        shell:
            "remamber fetch {wildcards.archive:q}.zip --dest {params.dest:q} > {log:q} 2>&1"

    rule extract:
        input:
            f"{RAW}/archives/{{archive}}.zip",
        output:
            f"{RAW}/.{{archive}}.zip.extracted",
        conda:
            "../envs/remamber.yaml"
        log:
            f"{LOGS}/extract/{{archive}}.log",
        shell:
            "remamber extract {input:q} --dest {RAW:q} > {log:q} 2>&1"

    def raw_inputs(wildcards):
        return [f"{RAW}/.{wildcards.dataset}.zip.extracted", f"{RAW}/.train2014.zip.extracted"]


rule preprocess:
    input:
        raw_inputs,
    output:
        index_meta("{dataset}"),
    params:
        out=lambda wc: f"{PROCESSED}/{wc.dataset}",
        split_by=lambda wc: DATA.datasets[wc.dataset].split_by,
        mask_mode=DATA.mask_mode,
        text_field=DATA.text_field,
        counts=EXPECTED_COUNTS,
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/preprocess/{{dataset}}.log",
    shell:
        "remamber preprocess --data-root {RAW:q} --dataset {wildcards.dataset:q} --split-by {params.split_by:q}"
        " --mask-mode {params.mask_mode:q} --text-field {params.text_field:q} {params.counts:q} --out {params.out:q}"
        " > {log:q} 2>&1"


rule data_all:
    input:
        [index_meta(d) for d in DATASETS],
