"""Prompt passes that read part of the prompt from a cache, or several prompts at once, change no number.

`cpu_attention.block_attention` sums each query over fixed key blocks, so a query's result does not
depend on what else the pass holds; `prompt_passes` relies on that to read the chat template's start
once and to share one padded pass among prompts of several lengths. Where the machine's products are
not exact row by row (float32 GEMMs), both stand aside: either way a row gets the tokens it gets alone.
"""

import pytest
import torch

from safesteer import SteeringSpec, cpu_attention, generate
from safesteer import decoding as decoding_module
from safesteer.prompt_passes import PACK_MIN_ROWS, new_cache, prompt_pass, right_padded, template_start
from safesteer.steering import SteeringState, steer
from tests.conftest import HARMFUL, SAFE


def _qkv(rows=2, heads=6, kv_heads=2, length=45, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, heads, length, dim, generator=g)
    keys = torch.randn(rows, kv_heads, length, dim, generator=g)
    values = torch.randn(rows, kv_heads, length, dim, generator=g)
    return query, keys, values


def test_block_attention_matches_sdpa():
    query, keys, values = _qkv()
    got = cpu_attention.block_attention(query, keys, values, None, 0.25)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, is_causal=True, scale=0.25, enable_gqa=True
    )
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-5)


def test_block_attention_matches_sdpa_on_a_left_padded_row():
    query, keys, values = _qkv()
    mask = torch.ones(45, 45, dtype=torch.bool).tril().expand(2, 1, 45, 45).clone()
    mask[1, :, :, :7] = False  # the second row's first seven keys are padding
    got = cpu_attention.block_attention(query, keys, values, mask, 0.25)
    want = torch.nn.functional.scaled_dot_product_attention(
        query[1:, :, 7:], keys[1:, :, 7:], values[1:, :, 7:], is_causal=True, scale=0.25, enable_gqa=True
    )
    assert torch.allclose(got[1:, 7:], want.transpose(1, 2), atol=1e-5)


def test_a_query_gets_the_same_numbers_whatever_else_the_pass_holds():
    """The queries after a cached start, and the same prompt left-padded, equal the whole pass bit for bit."""
    query, keys, values = _qkv(rows=1, length=70)
    whole = cpu_attention.block_attention(query, keys, values, None, 0.25)
    for start in (1, 23, 40, 64):
        rest = cpu_attention.block_attention(query[:, :, start:], keys, values, None, 0.25)
        assert torch.equal(rest, whole[:, start:])
    pad = 5
    padded = [torch.cat([torch.zeros(1, t.shape[1], pad, 16), t], dim=2) for t in (query, keys, values)]
    mask = torch.ones(75, 75, dtype=torch.bool).tril()
    mask[:, :pad] = False
    got = cpu_attention.block_attention(*padded, mask.expand(1, 1, 75, 75), 0.25)
    assert torch.equal(got[:, pad:], whole)


def test_right_padded_lays_rows_out_from_the_start():
    rows = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])]
    assert right_padded(rows).tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]


@pytest.fixture(scope="module")
def lm(tiny_fp32_and_int4):
    return tiny_fp32_and_int4


def test_prompts_of_several_lengths_share_a_pass_only_where_it_is_exact(lm, monkeypatch):
    """int4 products are exact row by row: one padded pass. float32 GEMMs are not here: a pass per length."""
    passes = []
    real = decoding_module.prompt_pass
    monkeypatch.setattr(decoding_module, "prompt_pass", lambda *a, **k: passes.append(a[1].shape) or real(*a, **k))
    prompts = [HARMFUL[0], SAFE[1], HARMFUL[2] + " Please explain every step.", SAFE[3]]
    spec = SteeringSpec(torch.randn(lm.identity.hidden_size, generator=torch.Generator().manual_seed(3)) * 4, 1)
    strengths = (0.0, 4.0, 2.0, 4.0)
    together = generate(lm, prompts, [SteeringSpec(spec.vector, 1, strengths)], max_new_tokens=16)
    lengths = {int(lm.encode([p])["attention_mask"].sum()) for p in prompts}
    shared = template_start(lm).exact()
    assert len(passes) == (1 if shared else len(lengths))
    passes.clear()
    alone = [
        generate(lm, [p], [SteeringSpec(spec.vector, 1, s)], max_new_tokens=16)[0]
        for p, s in zip(prompts, strengths, strict=True)
    ]
    assert together == alone


def test_where_passes_are_exact_even_a_left_padded_batch_is_each_prompt_alone(lm):
    """transformers pads on the left; block attention starts each row's blocks at its first real key."""
    if not template_start(lm).exact():
        pytest.skip("this model's products are not exact row by row here")
    prompts = [HARMFUL[0], SAFE[1] + " And why?", SAFE[3]]
    batch = generate(lm, prompts, [], max_new_tokens=16, decoder="transformers")
    assert batch == [generate(lm, [p], [], max_new_tokens=16, decoder="transformers")[0] for p in prompts]


def test_a_padded_pass_s_mlps_read_only_real_positions_and_change_no_number(lm):
    """Prompts of several lengths in one right-padded pass: each MLP gets the real rows packed, none of
    the padding, and every prompt's logits and cache are those of its own pass."""
    longer = " Tell me about it at some length, with examples, reasons, history, and what people said then."
    prompts = [HARMFUL[0], SAFE[1] + longer, SAFE[3]]
    ids = [lm.encode([p])["input_ids"][0] for p in prompts]
    lengths = [int(row.shape[0]) for row in ids]
    assert max(lengths) * len(lengths) - sum(lengths) >= PACK_MIN_ROWS  # enough padding to pack
    seen: list[int] = []
    hooks = [
        layer.mlp.gate_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:-1].numel()))
        for layer in lm.architecture.layers
    ]
    try:
        cache = new_cache(lm)
        with torch.inference_mode():
            together = prompt_pass(lm, right_padded(ids), lengths, 0, cache)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [sum(lengths)] * len(lm.architecture.layers)
    if not template_start(lm).exact():
        return  # float32 GEMMs here compute rows by their neighbours: nothing else to compare
    for row, prompt in enumerate(ids):
        own = new_cache(lm)
        with torch.inference_mode():
            alone = prompt_pass(lm, prompt[None], [lengths[row]], 0, own)
        assert torch.equal(together[row : row + 1], alone)
        for mine, shared in zip(own.layers, cache.layers, strict=True):
            assert torch.equal(mine.keys[0], shared.keys[row, :, : lengths[row]])
            assert torch.equal(mine.values[0], shared.values[row, :, : lengths[row]])


def test_steer_applies_a_state_decided_before_and_refuses_one_for_other_specs(tiny_lm):
    spec = SteeringSpec(torch.ones(tiny_lm.identity.hidden_size), 1, 2.0)
    state = SteeringState([spec])
    with steer(tiny_lm, [spec], decided=state) as used:
        assert used is state
    other = SteeringSpec(torch.ones(tiny_lm.identity.hidden_size), 1, 2.0)
    with pytest.raises(Exception, match="other specs"), steer(tiny_lm, [other], decided=state):
        pass


def test_a_template_start_does_not_keep_its_model_alive(tiny_lm):
    """The cache is per loaded model; a model its callers drop is freed, cache and all."""
    import copy
    import gc
    import weakref

    from safesteer.models import wrap_model

    lm = wrap_model(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, "tiny", "fp32")
    template_start(lm).exact()
    model = weakref.ref(lm.model)
    del lm
    gc.collect()
    assert model() is None


def test_prompt_weights_whose_gemm_depends_on_the_row_count_are_dropped(tmp_path_factory, monkeypatch, caplog):
    """Where the prompt GEMM sums rows differently with their number (other CPUs, thread counts), the
    int4 model reads prompts with the 4-bit kernel again, which computes rows alone, rather than let a
    prompt's numbers depend on its neighbours."""
    from safesteer import load_model
    from safesteer.int4 import Int4Linear, PromptWeight, int4_problem
    from tests.tiny import build_tiny_model

    if int4_problem() is not None:
        pytest.skip(f"int4 kernel unavailable: {int4_problem()}")
    lm = load_model(str(build_tiny_model(tmp_path_factory.mktemp("rows"))), "int4", device="cpu")  # its own copy
    layers = [m for m in lm.model.modules() if isinstance(m, Int4Linear)]
    if any(layer.prompt_weight is None for layer in layers):
        pytest.skip("this machine's bfloat16 GEMM keeps no prompt weights")
    product = PromptWeight.product
    # a GEMM whose last bits move with the number of rows it is given
    monkeypatch.setattr(PromptWeight, "product", lambda self, x: product(self, x) * (1 + 2**-7 * (x.shape[0] % 2)))
    assert template_start(lm).exact()  # exact again, on the 4-bit kernel
    assert all(layer.prompt_weight is None for layer in layers)
    assert "prompt passes differ with their neighbours" in caplog.text
