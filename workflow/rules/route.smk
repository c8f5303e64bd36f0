rule route:
    input:
        model_dir,
        windows="results/{experiment}/data/{dataset}/windows.parquet",
        documents="results/{experiment}/data/{dataset}/documents.parquet",
        info="results/{experiment}/data/{dataset}/info.json",
        null=null_input,
    output:
        metrics="results/{experiment}/runs/{routing}/{dataset}/metrics.json",
        summary="results/{experiment}/runs/{routing}/{dataset}/summary.json",
        routing="results/{experiment}/runs/{routing}/{dataset}/routing.parquet",
        scores="results/{experiment}/runs/{routing}/{dataset}/scores.parquet",
        provenance="results/{experiment}/runs/{routing}/{dataset}/provenance.json",
        system="results/{experiment}/runs/{routing}/{dataset}/system.json",
        decisions="results/{experiment}/runs/{routing}/{dataset}/decisions.parquet",
    log:
        "logs/{experiment}/route/{routing}/{dataset}.log",
    benchmark:
        "benchmarks/{experiment}/route/{routing}/{dataset}.tsv"
    params:
        model=model_ref,
        routing=routing_spec,
        null=null_arg,
        batch_size=config["evaluation"]["batch_size"],
        sample_every=config["evaluation"]["decision_sample_every"],
        options=model_options(),
        seed=config["seed"],
    threads: 1
    resources:
        gpu=1,
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/route.py --model {params.model:q} --routing {params.routing:q} {params.null}"
        " --data results/{wildcards.experiment}/data/{wildcards.dataset}"
        " --batch-size {params.batch_size} --sample-every {params.sample_every} {params.options}"
        " --seed {params.seed} --threads {threads}"
        " --out results/{wildcards.experiment}/runs/{wildcards.routing}/{wildcards.dataset} > {log} 2>&1"
