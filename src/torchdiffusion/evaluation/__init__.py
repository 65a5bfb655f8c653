"""L4 evaluation: metrics (the digits evaluator, Frechet distance) and pictures."""

