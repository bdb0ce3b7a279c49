"""Arrow schemas of every edge between roles, defined once.

A batch grows columns as it moves: generators emit ROLLOUT columns, scorers add SCORE columns, the
rewarder adds REWARD columns, and the learner reads the result. Per-probe columns are named
`probe/<name>/tokens` (per completion token) and `probe/<name>/score` (aggregate), so any number
of probes fit one table. Shapes: B rows; T_p prompt tokens and T_c completion tokens per row.
"""

from __future__ import annotations

import pyarrow as pa

PROMPT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.int64()),  # (P,) index into the task dataset
        pa.field("group_id", pa.int64()),  # (P,) unique per prompt per step; all its completions share it
        pa.field("prompt_ids", pa.list_(pa.int32())),  # (P, T_p) prompt token ids
        pa.field("answer", pa.string()),  # (P,) reference answer for the reward function
    ]
)  # driver -> generators: one step's prompts (P of them)

ROLLOUT_FIELDS = [
    pa.field("prompt_id", pa.int64()),  # (B,) index of the prompt in the task dataset
    pa.field("group_id", pa.int64()),  # (B,) rows sharing a prompt in one step; GRPO normalises within it
    pa.field("prompt_ids", pa.list_(pa.int32())),  # (B, T_p) prompt token ids
    pa.field("completion_ids", pa.list_(pa.int32())),  # (B, T_c) sampled token ids, EOS included if emitted
    pa.field("behavior_logprobs", pa.list_(pa.float32())),  # (B, T_c) log p of each sampled token under the generator
    pa.field("policy_version", pa.int64()),  # (B,) weight version that generated the row (the oldest of its tokens')
    pa.field("behavior_versions", pa.list_(pa.int64())),  # (B, T_c) weight version that sampled each token
    pa.field("answer", pa.string()),  # (B,) reference answer handed to the reward function
]
ROLLOUT_SCHEMA = pa.schema(ROLLOUT_FIELDS)



def rollout_table(prompts: list[list[int]], completions: list[list[int]], behavior: list[list[float]] | None = None,
                  groups: list[int] | None = None, version: int = 0, answers: list[str] | None = None) -> pa.Table:
    """A rollout table of these token ids (benchmarks, tests): behaviour log-probs -1.0 unless given, every token
    of weight version `version`, a group per row unless given."""
    n = len(prompts)
    return pa.Table.from_pydict(
        {"prompt_id": list(range(n)), "group_id": groups if groups is not None else list(range(n)),
         "prompt_ids": prompts, "completion_ids": completions,
         "behavior_logprobs": behavior if behavior is not None else [[-1.0] * len(c) for c in completions],
         "policy_version": [version] * n, "behavior_versions": [[version] * len(c) for c in completions],
         "answer": answers if answers is not None else [""] * n}, schema=ROLLOUT_SCHEMA)


REF_LOGPROBS = pa.field("ref_logprobs", pa.list_(pa.float32()))  # (B, T_c) frozen reference policy; empty if no KL
NONFINITE = pa.field("nonfinite_score", pa.bool_())  # (B,) some probe score was NaN/inf: excluded from the gradient

REWARD_FIELDS = [
    pa.field("task_reward", pa.float32()),  # (B,) from the task's reward function
    pa.field("shaped_reward", pa.float32()),  # (B,) after the shaping rule
    pa.field("loss_mask", pa.bool_()),  # (B,) False: the row gets no gradient (screened or non-finite)
    pa.field("advantage", pa.float32()),  # (B,) GRPO group-normalised shaped reward
]


def probe_token_field(name: str) -> pa.Field:
    return pa.field(f"probe/{name}/tokens", pa.list_(pa.float32()))  # (B, T_c) per-token probe probability


def probe_score_field(name: str) -> pa.Field:
    return pa.field(f"probe/{name}/score", pa.float32())  # (B,) aggregate over completion tokens


def scored_schema(probe_names: list[str]) -> pa.Schema:
    fields = [*ROLLOUT_FIELDS, REF_LOGPROBS, NONFINITE]
    for name in probe_names:
        fields += [probe_token_field(name), probe_score_field(name)]
    return pa.schema(fields)


def train_schema(probe_names: list[str]) -> pa.Schema:
    return pa.schema([*scored_schema(probe_names), *REWARD_FIELDS])


def probe_names_of(schema: pa.Schema) -> list[str]:
    return [n.split("/")[1] for n in schema.names if n.startswith("probe/") and n.endswith("/score")]


def check_schema(table: pa.Table, expected: pa.Schema, edge: str) -> None:
    """Internal invariant: an edge carries exactly its schema (order included)."""
    assert table.schema.equals(expected), (
        f"{edge}: schema mismatch\n got: {table.schema}\n want: {expected}"
    )
