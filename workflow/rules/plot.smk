# Per-run figures: one job per (routing, dataset) run. The PNG names are routelab.catalogue.RUN_FIGURES;
# figures that do not apply to a run (e.g. p-value figures of top-k routing) are written as a figure
# saying why and marked "drawn": false in index.json, which the report reads to link the figures.


rule plot_run:
    input:
        summary="results/{experiment}/runs/{routing}/{dataset}/summary.json",
        routing="results/{experiment}/runs/{routing}/{dataset}/routing.parquet",
        decisions="results/{experiment}/runs/{routing}/{dataset}/decisions.parquet",
        model=model_dir,
    output:
        **run_figure_outputs(),
        index="results/{experiment}/plots/{routing}/{dataset}/index.json",
    params:
        model=model_ref,
    log:
        "logs/{experiment}/plot_run/{routing}/{dataset}.log",
    threads: 1
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/plot_run.py --run-dir results/{wildcards.experiment}/runs/{wildcards.routing}/{wildcards.dataset}"
        " --out-dir results/{wildcards.experiment}/plots/{wildcards.routing}/{wildcards.dataset}"
        " --model {params.model:q} > {log} 2>&1"
