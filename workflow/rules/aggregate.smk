rule aggregate:
    input:
        run_summaries,
    output:
        runs="results/{experiment}/aggregate/runs.parquet",
        table=report(
            "results/{experiment}/aggregate/runs.csv",
            caption="../report/runs_table.rst",
            category="Tables",
        ),
        layers="results/{experiment}/aggregate/layers.csv",
    log:
        "logs/{experiment}/aggregate.log",
    params:
        runs=run_dirs,
    threads: 1
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/aggregate.py --runs {params.runs}"
        " --out-dir results/{wildcards.experiment}/aggregate > {log} 2>&1"
