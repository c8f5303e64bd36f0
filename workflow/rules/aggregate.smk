rule aggregate:
    input:
        # everything the aggregate reads from each run; routing.parquet for one layer's co-activation
        aggregate_inputs,
    output:
        runs="results/{experiment}/aggregate/runs.parquet",
        table=report(
            "results/{experiment}/aggregate/runs.csv",
            caption="../report/runs_table.rst",
            category="Tables",
        ),
        layers="results/{experiment}/aggregate/layers.csv",
        scores="results/{experiment}/aggregate/scores.parquet",
        expert_counts="results/{experiment}/aggregate/expert_counts.parquet",
        coactivation="results/{experiment}/aggregate/coactivation.parquet",
    log:
        "logs/{experiment}/aggregate.log",
    params:
        runs=run_dirs,
        layer=config["report"]["layer"],
    threads: 1
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/aggregate.py --runs {params.runs} --layer {params.layer}"
        " --out-dir results/{wildcards.experiment}/aggregate > {log} 2>&1"
