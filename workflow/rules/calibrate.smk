rule calibrate_null:
    input:
        model_dir,
        calibration=expand("results/{{experiment}}/data/{dataset}/calibration.parquet", dataset=DATASETS),
    output:
        null="results/{experiment}/calibration/{null}/null.npz",
        info="results/{experiment}/calibration/{null}/null.json",
    log:
        "logs/{experiment}/calibrate_null/{null}.log",
    benchmark:
        "benchmarks/{experiment}/calibrate_null/{null}.tsv"
    params:
        model=model_ref,
        grid_size=config["calibration"]["grid_size"],
        max_logits=config["calibration"]["max_logits_per_layer"],
        batch_size=config["evaluation"]["batch_size"],
        options=model_options(),
        seed=config["seed"],
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/calibrate_null.py --model {params.model:q} --calibration {input.calibration}"
        " --method {wildcards.null} --grid-size {params.grid_size} --quantiles {params.grid_size}"
        " --max-logits-per-layer {params.max_logits}"
        " --batch-size {params.batch_size} {params.options} --seed {params.seed}"
        " --out results/{wildcards.experiment}/calibration/{wildcards.null} > {log} 2>&1"
