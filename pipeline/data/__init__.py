"""The data plane's shared parts: the Arrow schemas of prompts, rollouts, scored and train tables (`schema`), token
budget batching (`batching`), log-probs from a model pass (`logprobs`) and the reward-shaping rules (`shaping`).
Floor 1: imports nothing of probe-rl but `pipeline.config`; the roles (actors/, learner/) and every floor above
use it."""
