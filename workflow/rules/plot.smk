# Per-run figures: one job per (routing, dataset) run. The PNG names are routelab.plots.RUN_FIGURES;
# figures that do not apply to a run (e.g. p-value figures of top-k routing) are written as a figure
# saying why and marked "drawn": false in index.json, which the report reads to link the figures.


rule plot_run:
    input:
        summary="results/{experiment}/runs/{routing}/{dataset}/summary.json",
        routing="results/{experiment}/runs/{routing}/{dataset}/routing.parquet",
        decisions="results/{experiment}/runs/{routing}/{dataset}/decisions.parquet",
        model=model_dir,
    output:
        experts_histogram=report(
            "results/{experiment}/plots/{routing}/{dataset}/experts_histogram.png",
            caption="../report/experts_histogram.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "experts selected"},
        ),
        expert_heatmap=report(
            "results/{experiment}/plots/{routing}/{dataset}/expert_heatmap.png",
            caption="../report/expert_heatmap.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "expert heatmap"},
        ),
        pvalue_distribution=report(
            "results/{experiment}/plots/{routing}/{dataset}/pvalue_distribution.png",
            caption="../report/pvalue_distribution.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "p-value distribution"},
        ),
        logit_vs_pvalue=report(
            "results/{experiment}/plots/{routing}/{dataset}/logit_vs_pvalue.png",
            caption="../report/logit_vs_pvalue.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "logit vs p-value"},
        ),
        bh_decisions=report(
            "results/{experiment}/plots/{routing}/{dataset}/bh_decisions.png",
            caption="../report/bh_decisions.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "BH step-up samples"},
        ),
        bh_pass_rate=report(
            "results/{experiment}/plots/{routing}/{dataset}/bh_pass_rate.png",
            caption="../report/bh_pass_rate.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "BH pass rate by rank"},
        ),
        routing_sequence=report(
            "results/{experiment}/plots/{routing}/{dataset}/routing_sequence.png",
            caption="../report/routing_sequence.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "sample sequence routing"},
        ),
        expert_utilisation=report(
            "results/{experiment}/plots/{routing}/{dataset}/expert_utilisation.png",
            caption="../report/expert_utilisation.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "expert utilisation"},
        ),
        token_rarity=report(
            "results/{experiment}/plots/{routing}/{dataset}/token_rarity.png",
            caption="../report/token_rarity.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "token rarity vs experts"},
        ),
        layer_experts=report(
            "results/{experiment}/plots/{routing}/{dataset}/layer_experts.png",
            caption="../report/layer_experts.rst",
            category="Per-run figures",
            subcategory="{routing}",
            labels={"routing": "{routing}", "dataset": "{dataset}", "figure": "experts per layer"},
        ),
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
