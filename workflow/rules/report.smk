rule report:
    input:
        runs="results/{experiment}/aggregate/runs.parquet",
        plots=run_plots,
    output:
        csv="results/{experiment}/report/comparison.csv",
        markdown="results/{experiment}/report/comparison.md",
        alpha=report(
            "results/{experiment}/report/figures/experts_vs_alpha.png",
            caption="../report/experts_vs_alpha.rst",
            category="Comparison",
        ),
        quality=report(
            "results/{experiment}/report/figures/quality_vs_experts.png",
            caption="../report/quality_vs_experts.rst",
            category="Comparison",
        ),
        html="results/{experiment}/report/report.html",
    log:
        "logs/{experiment}/report.log",
    params:
        baseline=BASELINE,
    threads: 1
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/report.py --runs {input.runs} --plots-root results/{wildcards.experiment}/plots"
        " --experiment {wildcards.experiment} --baseline {params.baseline}"
        " --out-dir results/{wildcards.experiment}/report > {log} 2>&1"
