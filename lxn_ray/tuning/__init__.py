"""Ray Tune: the search space, trials that reuse the training loop, and publishing the best trial."""
