rule collect_router_logits:
    input:
        model_dir,
        calibration=expand("results/{{experiment}}/data/{dataset}/calibration.parquet", dataset=DATASETS),
    output:
        "results/{experiment}/calibration/router_logits.npz",
    log:
        "logs/{experiment}/collect_router_logits.log",
    benchmark:
        "benchmarks/{experiment}/collect_router_logits.tsv"
    params:
        model=model_ref,
        max_logits=config["calibration"]["max_logits_per_layer"],
        batch_size=config["evaluation"]["batch_size"],
        options=model_options(),
        seed=config["seed"],
    threads: share_of_cores(2)
    # Highest: the BH and HC route jobs wait for the null; on one core of two (share_of_cores), the
    # route jobs that need no null start beside it.
    priority: 50
    resources:
        gpu=config["model"]["gpus"],
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/collect_router_logits.py --model {params.model:q} --calibration {input.calibration}"
        " --max-logits-per-layer {params.max_logits} --batch-size {params.batch_size} {params.options}"
        " --seed {params.seed} --out {output} > {log} 2>&1"


rule calibrate_null:
    input:
        logits="results/{experiment}/calibration/router_logits.npz",
    output:
        null="results/{experiment}/calibration/{null}/null.npz",
        info="results/{experiment}/calibration/{null}/null.json",
    log:
        "logs/{experiment}/calibrate_null/{null}.log",
    params:
        grid_size=config["calibration"]["grid_size"],
    threads: share_of_cores(2)
    priority: 50
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/calibrate_null.py --logits {input.logits} --method {wildcards.null}"
        " --grid-size {params.grid_size} --quantiles {params.grid_size}"
        " --out results/{wildcards.experiment}/calibration/{wildcards.null} > {log} 2>&1"
