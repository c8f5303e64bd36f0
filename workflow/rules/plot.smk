rule plot_run:
    input:
        summary="results/{experiment}/runs/{routing}/{dataset}/summary.json",
        routing="results/{experiment}/runs/{routing}/{dataset}/routing.parquet",
    output:
        histogram=report(
            "results/{experiment}/plots/{routing}/{dataset}/experts_histogram.png",
            caption="../report/experts_histogram.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "experts selected"},
        ),
        heatmap=report(
            "results/{experiment}/plots/{routing}/{dataset}/expert_heatmap.png",
            caption="../report/expert_heatmap.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "expert heatmap"},
        ),
    log:
        "logs/{experiment}/plot_run/{routing}/{dataset}.log",
    threads: 1
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/plot_run.py --run-dir results/{wildcards.experiment}/runs/{wildcards.routing}/{wildcards.dataset}"
        " --out-dir results/{wildcards.experiment}/plots/{wildcards.routing}/{wildcards.dataset} > {log} 2>&1"
