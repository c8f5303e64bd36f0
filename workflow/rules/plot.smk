# Per-run figures: one job per routing config draws the figures of its run on every dataset (one
# process per config instead of one per run: the start-up, imports included, costs more than drawing a
# run). The PNG names are routelab.catalogue.RUN_FIGURES; figures that do not apply to a run (e.g. p-value
# figures of top-k routing) are written as a figure saying why and marked "drawn": false in index.json,
# which the report reads to link the figures.


rule plot_run:
    input:
        runs=config_run_files,
        model=model_dir,
    output:
        **run_figure_outputs(),
    wildcard_constraints:
        routing=one_of(FULL_ROUTINGS),
    params:
        runs=config_runs,
        plots=config_plot_dirs,
        model=model_ref,
    log:
        "logs/{experiment}/plot_run/{routing}.log",
    threads: 1
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/plot_run.py --run-dir {params.runs} --out-dir {params.plots}"
        " --model {params.model:q} > {log} 2>&1"


# A teacher-forced routing config has no runs on the lm-eval tasks that generate: no figures of them.
if PARTIAL_ROUTINGS:

    use rule plot_run as plot_run_causal_only with:
        output:
            **run_figure_outputs(CAUSAL_ONLY_DATASETS),
        wildcard_constraints:
            routing=one_of(PARTIAL_ROUTINGS),
