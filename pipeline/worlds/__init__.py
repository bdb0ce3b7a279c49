"""What a run trains on: task definitions (prompts, verifiers, ground truth: `tasks`), the toy world probe-rl builds
itself (tokenizer, tiny Llama, SFT, probes: `toy`), and the resolved `World` of a run (model, tokenized prompts,
probes, evaluation set: `world`). Floor 2: imports floors 0-1 and `probes/`; never `transport/` or above."""
