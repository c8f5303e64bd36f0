rule aggregate:
    input:
        # everything the aggregate reads from each run, and the tokenizer that decodes token ids
        aggregate_inputs,
        model_dir,
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
        analyses=expand("results/{{experiment}}/aggregate/{table}.parquet", table=ANALYSIS_TABLES),
    log:
        "logs/{experiment}/aggregate.log",
    params:
        runs=run_dirs,
        layer=config["report"]["layer"],
        baseline=BASELINE,
        tokenizer=model_ref,
        explorer_documents=config["evaluation"]["explorer_documents"],
        explorer_tokens=config["report"]["explorer_tokens"],
    # The routing analyses read the datasets' logs in parallel (share_of_cores: why not on all cores).
    # Priority above plot_run: it starts when the last route job ends and overlaps the plots.
    threads: share_of_cores(2)
    priority: 10
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/aggregate.py --runs {params.runs} --layer {params.layer}"
        " --baseline {params.baseline} --tokenizer {params.tokenizer:q} --workers {threads}"
        " --explorer-documents {params.explorer_documents} --explorer-tokens {params.explorer_tokens}"
        " --out-dir results/{wildcards.experiment}/aggregate > {log} 2>&1"
