rule prepare_dataset:
    input:
        model_dir,
        dataset_download,
    output:
        documents="results/{experiment}/data/{dataset}/documents.parquet",
        windows="results/{experiment}/data/{dataset}/windows.parquet",
        calibration="results/{experiment}/data/{dataset}/calibration.parquet",
        info="results/{experiment}/data/{dataset}/info.json",
    log:
        "logs/{experiment}/prepare_dataset/{dataset}.log",
    params:
        spec=dataset_spec,
        model=model_ref,
        window=config["evaluation"]["window"] or "",
        add_bos_token={None: "", True: "true", False: "false"}[config["evaluation"]["add_bos_token"]],
        seed=config["seed"],
    threads: 1
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/prepare_dataset.py --spec {params.spec:q} --model {params.model:q}"
        " --seed {params.seed} $( [ -n '{params.window}' ] && echo --window {params.window} )"
        " $( [ -n '{params.add_bos_token}' ] && echo --add-bos-token {params.add_bos_token} )"
        " --out results/{wildcards.experiment}/data/{wildcards.dataset} > {log} 2>&1"
