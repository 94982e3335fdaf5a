"""Running the long stages (pre-training, DP fine-tuning) as distributed jobs on a
Kubernetes cluster's training operator: the job manifests (`jobs`), their launch
and watch (`launcher`), and a stage run that way from a Kubeflow task (`stage_job`)."""
