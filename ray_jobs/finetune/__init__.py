"""The fine-tuning study on Ray Tune: folds, size subsets, per-trial training, sample-count search."""
