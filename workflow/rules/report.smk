rule report:
    input:
        runs="results/{experiment}/aggregate/runs.parquet",
        scores="results/{experiment}/aggregate/scores.parquet",
        expert_counts="results/{experiment}/aggregate/expert_counts.parquet",
        coactivation="results/{experiment}/aggregate/coactivation.parquet",
        analyses=expand("results/{{experiment}}/aggregate/{table}.parquet", table=ANALYSIS_TABLES),
        plots=run_plots,
    output:
        findings_md="results/{experiment}/report/findings.md",
        findings_json="results/{experiment}/report/findings.json",
        csv="results/{experiment}/report/comparison.csv",
        markdown="results/{experiment}/report/comparison.md",
        latex=report(
            "results/{experiment}/report/comparison.tex",
            caption="../report/comparison_tex.rst",
            category="Tables",
        ),
        quality_ci="results/{experiment}/report/quality_ci.csv",
        rliable="results/{experiment}/report/rliable_intervals.csv",
        **report_figure_outputs(),
        html="results/{experiment}/report/report.html",
        # the token explorer's data, one script per run, loaded by report.html on demand
        explorer=directory("results/{experiment}/report/explorer"),
    log:
        "logs/{experiment}/report.log",
    params:
        baseline=BASELINE,
        repetitions=config["report"]["bootstrap_repetitions"],
        confidence=config["report"]["confidence"],
        seed=config["report"]["seed"],
        layer=config["report"]["layer"],
        tolerances=config["report"]["tolerances"],  # a list: the shell gets it space-separated
    # the last job: a forked child draws half the figures on the second core
    threads: 2
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/report.py --runs {input.runs} --plots-root results/{wildcards.experiment}/plots"
        " --experiment {wildcards.experiment} --baseline {params.baseline} --repetitions {params.repetitions}"
        " --confidence {params.confidence} --seed {params.seed} --layer {params.layer}"
        " --tolerances {params.tolerances} --workers {threads}"
        " --out-dir results/{wildcards.experiment}/report > {log} 2>&1"
