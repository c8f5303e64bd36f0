# Fetch the configured hub model and hub datasets into resources/ before any job that runs the model.
# Local jobs (they need internet, not a GPU): `snakemake download` on a login node fetches everything;
# later jobs, on compute nodes without internet, read only resources/.


rule download:
    localrule: True
    input:
        download_targets(),


if HUB_MODEL:

    rule download_model:
        localrule: True
        output:
            directory(MODEL_RESOURCE),
        log:
            "logs/download/model.log",
        params:
            model=config["model"]["id"],
            revision=revision_option(),
        threads: 1
        conda:
            "../../envs/routelab.yaml"
        shell:
            "python workflow/scripts/download.py model --id {params.model:q} {params.revision}"
            " --out {output:q} > {log} 2>&1"


if HUB_DATASETS:

    rule download_dataset:
        localrule: True
        output:
            directory("resources/datasets/{dataset}"),
        log:
            "logs/download/dataset/{dataset}.log",
        params:
            spec=dataset_spec,
        wildcard_constraints:
            dataset=one_of(HUB_DATASETS),
        threads: 1
        conda:
            "../../envs/routelab.yaml"
        shell:
            "python workflow/scripts/download.py dataset --spec {params.spec:q} --out {output:q} > {log} 2>&1"


if TASK_DATASETS:

    rule download_task:
        localrule: True
        output:
            "resources/lm_eval/{dataset}.json",
        log:
            "logs/download/task/{dataset}.log",
        params:
            spec=dataset_spec,
        wildcard_constraints:
            dataset=one_of(TASK_DATASETS),
        threads: 1
        conda:
            "../../envs/routelab.yaml"
        shell:
            "python workflow/scripts/download.py task --spec {params.spec:q} --out {output:q} > {log} 2>&1"
