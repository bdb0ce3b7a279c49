import pytest
import torch
from transformers import AutoModelForCausalLM

from probes.hooks import capture_residuals, decoder_layers


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_captured_residuals_equal_hidden_states(model):
    ids = torch.randint(3, 20, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        with capture_residuals(model, [0, 1]) as cap:
            model(input_ids=ids)
    assert torch.allclose(cap.residuals[0], ref[1], atol=1e-6)
    # the last block's output is normalised before it is returned as the last hidden state
    final = model.model.norm(cap.residuals[1])
    assert torch.allclose(final, ref[2], atol=1e-5)


def test_hooks_are_removed_even_on_error(model):
    blocks = decoder_layers(model)
    before = [len(b._forward_hooks) for b in blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_residuals(model, [0, 1]):
            raise RuntimeError("boom")
    assert [len(b._forward_hooks) for b in blocks] == before


def test_stop_after_skips_later_layers(model):
    calls = []
    handle = decoder_layers(model)[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), capture_residuals(model, [0], stop_after=0) as cap:
            model(input_ids=torch.randint(3, 20, (1, 5)))
            raise AssertionError("the forward pass should have stopped")  # pragma: no cover
    finally:
        handle.remove()
    assert cap.stopped_early and 0 in cap.residuals and calls == []


def test_bad_layer_index_is_refused(model):
    with pytest.raises(ValueError, match="layer 5 does not exist: the model has 2 decoder layers"):
        with capture_residuals(model, [5]):
            pass
