"""The `data` stage and what it is made of: sources, cleaning and filters, deduplication and
decontamination, the embedded standard-library corpus, the data card, and the checks `verify` runs
on a run's documents."""
