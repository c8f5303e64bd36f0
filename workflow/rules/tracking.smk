# Optional: replay every run's tracking files into TensorBoard and/or MLflow (config `tracking`).
# The files on disk stay the source of truth; switching an exporter on or off reruns only this job.


localrules:
    export_tracking,


rule export_tracking:
    input:
        model_dir,
        summaries=run_summaries,
    output:
        "results/{experiment}/tracking/exported.json",
    log:
        "logs/{experiment}/export_tracking.log",
    params:
        runs=run_dirs,
        options=tracking_options,
    threads: 1
    conda:
        "../../envs/tracking.yaml"
    shell:
        "python workflow/scripts/export_tracking.py --experiment {wildcards.experiment} --runs {params.runs}"
        " {params.options} --out {output} > {log} 2>&1"
