"""probe-rl's orchestration, in floors that import only downward (tests/unit/test_architecture.py checks it):

    config, cores, faults,     floor 0: the config tree, roles' threads that follow the phase, fault-injection
    progress                            hooks for tests, progress bars
    data/                      floor 1: what flows between roles (Arrow schemas, batching, log-probs, reward shaping)
    worlds/  transport/        floor 2: tasks and the toy world; weights and their transports, what runs in vLLM
    loop/                      floor 3: the control plane: the training loop, the fleet of actors, metrics, run folders
    analysis/                  floor 4: experiment, report, profile, cost model
    cli/                       floor 5: the `probe-rl` command line and Ray job submission

The roles themselves live beside this package: `actors/` (generator, scorer, evaluator), `learner/`, `probes/`.
See docs/architecture.md.
"""
