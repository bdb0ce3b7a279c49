"""Prompts of an instruct model go through its chat template (pipeline/worlds/tasks.py: prompt_encoder), with the
real SmolLM2-135M-Instruct tokenizer; the packaged-model folder loads as a transformers model with tied
embeddings (pipeline/worlds/pretrained.py)."""

from __future__ import annotations

import json

import pytest

from pipeline.worlds.tasks import check_vocabulary, prompt_encoder

QUESTION = "What is 23 + 14? Answer with the number only."


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_prompts_become_a_user_turn_ending_in_the_assistants_generation_prompt(tokenizer):
    [ids] = prompt_encoder(tokenizer, None, None, "smollm2")([QUESTION])  # None: on, since the tokenizer has one
    text = tokenizer.decode(ids)
    assert text.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's default system turn
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # the template's text, token for token
    assert ids[-1] == tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    assert tokenizer.decode(ids[-4:]) == "<|im_start|>assistant\n"  # the assistant's turn is opened, not closed
    # the model's EOS (where generation stops) is the token that closes a turn
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2 and 2 in ids


def test_a_system_prompt_replaces_the_templates_and_raw_text_stays_raw(tokenizer):
    [ids] = prompt_encoder(tokenizer, True, "Answer tersely.", "smollm2")([QUESTION])
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nAnswer tersely.<|im_end|>\n<|im_start|>user\n")
    [raw] = prompt_encoder(tokenizer, False, None, "smollm2")([QUESTION])
    assert raw == tokenizer(QUESTION)["input_ids"] and "<|im_start|>" not in tokenizer.decode(raw)
    with pytest.raises(ValueError, match="task.system_prompt needs the chat template"):
        prompt_encoder(tokenizer, False, "Answer tersely.", "smollm2")


def test_a_template_asked_of_a_tokenizer_without_one_is_an_error(tiny_model_dir):
    from transformers import AutoTokenizer

    toy = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not toy.chat_template
    assert prompt_encoder(toy, None, None, "tiny")(["1+2="]) == [toy("1+2=")["input_ids"]]  # None: off, raw
    with pytest.raises(ValueError, match="has no chat template; set task.chat_template = false"):
        prompt_encoder(toy, True, None, "tiny")


def test_a_tokenizer_larger_than_the_embedding_is_refused(tokenizer, tiny_model_dir):
    from transformers import AutoConfig

    small = AutoConfig.from_pretrained(tiny_model_dir)  # 64 rows against SmolLM2's 49,152 tokens
    with pytest.raises(ValueError, match="its tokenizer has 49152 tokens but the model's embedding only 64 rows"):
        check_vocabulary(tokenizer, small, "mixed")


def test_the_built_folder_is_a_plain_transformers_model_with_tied_embeddings(smollm2_dir, tokenizer):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg and not any("/" in str(v) for v in cfg.values())  # no machine paths
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # the tied matrix stored once
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    [ids] = prompt_encoder(tokenizer, None, None, "smollm2")([QUESTION])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, len(ids):]) == "23 + 14 = 37<|im_end|>"  # it can add, and it stops


def test_a_dataset_of_chat_turns_goes_through_the_template_as_given(tokenizer, tmp_path):
    from pipeline.worlds.tasks import load_prompt_file

    turns = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "7 + 5?"},
             {"role": "assistant", "content": "12"}, {"role": "user", "content": "And 7 + 6?"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": turns, "answer": 13, "level": 2}) + "\n")
    data = load_prompt_file(tmp_path / "chat.jsonl")
    assert data.prompts == [turns] and data.answers == ["13"] and data.columns == {"level": [2]}
    [ids] = prompt_encoder(tokenizer, None, None, "smollm2")(data.prompts)
    assert tokenizer.decode(ids) == ("<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n7 + 5?"
                                     "<|im_end|>\n<|im_start|>assistant\n12<|im_end|>\n<|im_start|>user\nAnd 7 + 6?"
                                     "<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="the dataset gives chat turns .* need the chat template"):
        prompt_encoder(tokenizer, False, None, "smollm2")(data.prompts)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}], "answer": 1}))
    with pytest.raises(ValueError, match=r"row 1: `messages` must be a non-empty list of"):
        load_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "mixed.jsonl").write_text(json.dumps({"messages": turns, "answer": 1}) + "\n"
                                          + json.dumps({"prompt": "1+1=", "answer": 2}) + "\n")
    with pytest.raises(ValueError, match="some rows give a `prompt` and others `messages`"):
        load_prompt_file(tmp_path / "mixed.jsonl")
