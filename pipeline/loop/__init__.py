"""The control plane: the training loop (`driver`), the actors it drives and keeps alive (`fleet`, on Ray through
`remote`), the rewarder, evaluation points and the probe refit (`evaluation`), metrics and their sinks (`metrics`,
`loggers`), run folders and checkpoint side files (`run_dir`, `checkpoints`). Floor 3: imports floors 0-2 and the
roles (actors/, learner/); never `analysis/` or `cli/`."""
