# One evaluation job per trained model (every sentence of every object of every split), the controls, and the
# figure data.


rule evaluate:
    input:
        ckpt=f"{RESULTS}/models/{{dataset}}/{{variant}}/{{res}}/best.pt",
        index=index_meta("{dataset}"),
    output:
        metrics_file("{dataset}", "{variant}", "{res}"),
    params:
        index=lambda wc: f"{PROCESSED}/{wc.dataset}",
        splits=lambda wc: splits(wc.dataset),
    threads: 1
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/evaluate/{{dataset}}/{{variant}}/{{res}}.log",
    shell:
        "remamber --threads {threads} evaluate --checkpoint {input.ckpt:q} --split {params.splits:q}"
        " --index-dir {params.index:q} --data-root {RAW:q} --out {output:q} > {log:q} 2>&1"


# The shuffled-text control: the same model, every sentence moved to a sample of another image.
rule evaluate_shuffled_text:
    input:
        ckpt=f"{RESULTS}/models/{{dataset}}/{{variant}}/{{res}}/best.pt",
        index=index_meta("{dataset}"),
    output:
        shuffled_metrics_file("{dataset}", "{variant}", "{res}"),
    params:
        index=lambda wc: f"{PROCESSED}/{wc.dataset}",
        splits=lambda wc: splits(wc.dataset),
    threads: 1
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/evaluate/{{dataset}}/{{variant}}/{{res}}.shuffled.log",
    shell:
        "remamber --threads {threads} evaluate --text shuffled --checkpoint {input.ckpt:q} --split {params.splits:q}"
        " --index-dir {params.index:q} --data-root {RAW:q} --out {output:q} > {log:q} 2>&1"


# Text-blind baselines: one object of the image picked without the sentence (no model, no torch).
rule baselines:
    input:
        index=index_meta("{dataset}"),
    output:
        baseline_file("{dataset}"),
    params:
        index=lambda wc: f"{PROCESSED}/{wc.dataset}",
        splits=lambda wc: splits(wc.dataset),
    threads: 1
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/baselines/{{dataset}}.log",
    shell:
        "remamber baseline --index-dir {params.index:q} --split {params.splits:q} --data-root {RAW:q}"
        " --out {output:q} > {log:q} 2>&1"


rule inspect:
    input:
        ckpt=f"{RESULTS}/models/{{dataset}}/{{variant}}/{{res}}/best.pt",
        index=index_meta("{dataset}"),
    output:
        f"{RESULTS}/inspect/{{dataset}}/{{variant}}/{{res}}/{{split}}.npz",
    params:
        index=lambda wc: f"{PROCESSED}/{wc.dataset}",
    threads: 1
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/inspect/{{dataset}}/{{variant}}/{{res}}/{{split}}.log",
    shell:
        "remamber --threads {threads} inspect --checkpoint {input.ckpt:q} --split {wildcards.split:q}"
        " --index-dir {params.index:q} --data-root {RAW:q} --out {output:q} > {log:q} 2>&1"


rule evaluate_all:
    input:
        all_metrics(),


rule inspect_all:
    input:
        [inspect_file(v) for v in FIG_SPEC["variants"]],
