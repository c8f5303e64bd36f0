rule train_demo_model:
    output:
        model=directory("results/{experiment}/model"),
    log:
        "logs/{experiment}/train_demo_model.log",
    benchmark:
        "benchmarks/{experiment}/train_demo_model.tsv"
    params:
        settings=as_json(config["demo_model"]),
        seed=config["seed"],
    threads: 4
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/train_demo_model.py --settings {params.settings:q} --seed {params.seed}"
        " --threads {threads} --out {output.model} > {log} 2>&1"
