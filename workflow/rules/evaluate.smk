# One evaluation per trained model and split (every sentence of every object), and the figure data.


rule evaluate:
    input:
        ckpt=f"{RESULTS}/models/{{dataset}}/{{variant}}/{{res}}/best.pt",
        index=index_meta("{dataset}"),
    output:
        f"{RESULTS}/metrics/{{dataset}}/{{variant}}/{{res}}/{{split}}.json",
    params:
        index=lambda wc: f"{PROCESSED}/{wc.dataset}",
    threads: 1
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/evaluate/{{dataset}}/{{variant}}/{{res}}/{{split}}.log",
    shell:
        "remamber --threads {threads} evaluate --checkpoint {input.ckpt} --split {wildcards.split} --index-dir {params.index}"
        " --data-root {RAW} --out {output} > {log} 2>&1"


rule evaluate_shuffled_text:
    input:
        ckpt=f"{RESULTS}/models/{{dataset}}/{{variant}}/{{res}}/best.pt",
        index=index_meta("{dataset}"),
    output:
        f"{RESULTS}/metrics/{{dataset}}/{{variant}}/{{res}}/{{split}}.shuffled.json",
    params:
        index=lambda wc: f"{PROCESSED}/{wc.dataset}",
    threads: 1
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/evaluate/{{dataset}}/{{variant}}/{{res}}/{{split}}.shuffled.log",
    shell:
        "remamber --threads {threads} evaluate --text shuffled --checkpoint {input.ckpt:q} --split {wildcards.split}"
        " --index-dir {params.index:q} --data-root {RAW:q} --out {output:q} > {log:q} 2>&1"


rule baselines:
    input:
        index=index_meta("{dataset}"),
    output:
        [f"{RESULTS}/metrics/{{dataset}}/baselines/{{split}}/{kind}.json" for kind in BASELINES],
    params:
        index=lambda wc: f"{PROCESSED}/{wc.dataset}",
        out_dir=lambda wc: f"{RESULTS}/metrics/{wc.dataset}/baselines/{wc.split}",
    threads: 1
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/baselines/{{dataset}}/{{split}}.log",
    shell:
        "remamber baseline --index-dir {params.index:q} --split {wildcards.split} --data-root {RAW:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


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
        "remamber --threads {threads} inspect --checkpoint {input.ckpt} --split {wildcards.split} --index-dir {params.index}"
        " --data-root {RAW} --out {output} > {log} 2>&1"


rule evaluate_all:
    input:
        all_metrics(),


rule inspect_all:
    input:
        [inspect_file(v) for v in FIG_SPEC["variants"]],
