"""The `eval` stage: validation loss per source, log-likelihood multiple choice and generation tasks,
scored on data the model never trained on (items overlapping the training stream are removed)."""
