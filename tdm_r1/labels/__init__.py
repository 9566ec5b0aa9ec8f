"""Human likes as a reward: the label store (SQLite in the run directory), the labelling page (`tdm-r1 label`) and
the simulated labeller (`tdm-r1 label-sim`)."""
