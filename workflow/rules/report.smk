# Reports read evaluation outputs only: metrics JSON, figure data, training histories.


rule table:
    input:
        table_metrics,
    output:
        tex=report(f"{REPORTS}/{{table}}.tex", caption="../report/table.rst", category="Tables"),
        csv=f"{REPORTS}/{{table}}.csv",
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/report/{{table}}.log",
    shell:
        "remamber report --config {CONFIGFILE:q} --table {wildcards.table:q} --metrics-root {RESULTS:q}/metrics"
        " --out {REPORTS:q} > {log:q} 2>&1"


rule metrics_summary:
    input:
        all_metrics(),
    output:
        f"{REPORTS}/metrics.json",
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/report/metrics.log",
    shell:
        "remamber summarize {input:q} --out {output:q} > {log:q} 2>&1"


rule fig_interaction_vs_attention:
    input:
        twister=inspect_file("twister"),
        attention=inspect_file("attention"),
    output:
        png=report(f"{REPORTS}/figures/fig4_interaction_vs_attention.png", caption="../report/fig4.rst", category="Figures"),
        pdf=f"{REPORTS}/figures/fig4_interaction_vs_attention.pdf",
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/report/fig4.log",
    shell:
        "remamber figure interaction --twister {input.twister:q} --attention {input.attention:q}"
        " --out {REPORTS:q}/figures/fig4_interaction_vs_attention > {log:q} 2>&1"


rule fig_cube_pca:
    input:
        inspect_file("twister"),
    output:
        png=report(f"{REPORTS}/figures/fig5_cube_pca.png", caption="../report/fig5.rst", category="Figures"),
        pdf=f"{REPORTS}/figures/fig5_cube_pca.pdf",
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/report/fig5.log",
    shell:
        "remamber figure pca --twister {input:q} --out {REPORTS:q}/figures/fig5_cube_pca > {log:q} 2>&1"


rule fig_overlays:
    input:
        [inspect_file(v) for v in FIG_SPEC["variants"]],
    output:
        png=report(f"{REPORTS}/figures/fig7_overlays.png", caption="../report/fig7.rst", category="Figures"),
        pdf=f"{REPORTS}/figures/fig7_overlays.pdf",
    params:
        pairs=[f"{v}={inspect_file(v)}" for v in FIG_SPEC["variants"]],  # one quoted argument each
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/report/fig7.log",
    shell:
        "remamber figure overlays {params.pairs:q} --out {REPORTS:q}/figures/fig7_overlays > {log:q} 2>&1"


rule fig_training_curves:
    input:
        [f"{model_dir(FIG_DATASET, v, FIG_RES)}/history.json" for v in FIG_SPEC["variants"]],
    output:
        png=report(f"{REPORTS}/figures/training_curves.png", caption="../report/curves.rst", category="Figures"),
        pdf=f"{REPORTS}/figures/training_curves.pdf",
    params:
        pairs=[f"{v}={model_dir(FIG_DATASET, v, FIG_RES)}/history.json" for v in FIG_SPEC["variants"]],
    conda:
        "../envs/remamber.yaml"
    log:
        f"{LOGS}/report/curves.log",
    shell:
        "remamber figure curves {params.pairs:q} --out {REPORTS:q}/figures/training_curves > {log:q} 2>&1"


rule reports_all:
    input:
        all_reports(),
