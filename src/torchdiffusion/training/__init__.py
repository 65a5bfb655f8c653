"""L4 training: the loop, EMA, checkpoints, distributed data parallelism."""

